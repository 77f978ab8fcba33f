"""A request's result as the service hands it back (``WorkerLogic.process``, ``ServiceHandle.process``).

One shape whether the request was served, refused by the client (malformed, no room) or failed on a worker:
every field is always there. Kept apart from the worker so the client's logic (``actors.service_logic``) builds
it without the worker's imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestResult:
    """One request's outcome.

    Attributes:
        id: the request's ``id`` (None when it had none).
        worker, node: the worker that served it and its node; None when no worker did.
        output: the answer (text; the synthetic engine's digest); None on error.
        error: ``"SomeError: message"`` when the request failed on its own; None when it was served.
        prompt_tokens, completion_tokens: as the engine counted them; None when unknown or on error.
        cached_tokens: prompt tokens reused from the cache; None on error.
        cached_tiers: those tokens per tier (``device``: the worker's own; ``host``/``disk``: its node agent's;
            ``remote``: another node's agent).
        vision_cache_hits: images whose vision encoding the engine reused.
        device_chunks, cross_node_chunks: fetched prefix chunks from the worker's device tier / another node.
        computed_chunks, stored_chunks: prompt chunks computed this run / handed to an agent.
        ttft_s: seconds to the first token, prefix fetch included; fetch_s: the fetch alone.
        engine_cached_tokens: tokens the engine reported reusing (an engine owning the device tier), else None.
        token_ids: generated tokens, when the engine reports them.
        attempts: workers the client sent it to (``ServiceHandle.process``); None when never sent.
    """

    id: Any = None
    worker: str | None = None
    node: str | None = None
    output: Any = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    cached_tiers: dict[str, int] = field(default_factory=dict)
    vision_cache_hits: int = 0
    device_chunks: int = 0
    cross_node_chunks: int = 0
    computed_chunks: int = 0
    stored_chunks: int = 0
    ttft_s: float | None = None
    fetch_s: float | None = None
    engine_cached_tokens: int | None = None
    token_ids: list[int] | None = None
    attempts: int | None = None


def error_result(request: Any, error: str, worker: str | None = None, node: str | None = None) -> RequestResult:
    """The result of a request that failed on its own (bad input, no room): ``error`` set, the rest empty.
    The same shape whether a worker or the client (``actors.service``) rejected it."""
    return RequestResult(id=request.get("id") if isinstance(request, dict) else None, worker=worker, node=node,
                         error=error)
