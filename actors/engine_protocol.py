"""The engine protocol a worker serves requests with, and what one run of it returns.

``actors.engine_adapter.Qwen3VLEngineAdapter`` (the real model, the default) and
``actors.synthetic_engine.SyntheticKVEngine`` (model-free test/benchmark workload) implement it; an engine
named ``module:callable`` in ``WorkerConfig.engine`` must too (``actors.worker.load_engine`` checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from qwen3vl_ray.keys import CacheKey, Namespace


@dataclass(slots=True)
class EngineRun:
    """One request's run, as the engine reports it to the worker.

    Attributes:
        new_chunks: tensors of the prompt chunks computed this run, in order: the keys after the cached ones
            (an engine may stop early; the worker ships what it got).
        output: the answer (text, or the synthetic engine's digest); None when ``error`` is set.
        prompt_tokens: tokens of the prompt; None: the worker counts ``len(keys) x chunk_tokens``.
        ttft_s: seconds to the first token, decoding excluded; None: the worker times the whole run.
        token_ids: generated tokens; None when the engine does not report them.
        vision_cache_hits: images whose vision encoding came from the engine's memo.
        engine_cached_tokens: prompt tokens the engine really reused (an engine owning the device tier);
            None: the worker counts the chunks it fetched.
        device_chunks: leading fetched chunks the engine's own device tier already held (device hits, not
            the agent's).
        below_tokens: the last of ``engine_cached_tokens`` that the engine brought back from the tier below
            itself (a chat session's tail): host hits.
        error: the request failed (bad image, bad messages): its result's error, not the worker's.
    """

    new_chunks: list = field(default_factory=list)
    output: Any = None
    prompt_tokens: int | None = None
    ttft_s: float | None = None
    token_ids: list[int] | None = None
    vision_cache_hits: int = 0
    engine_cached_tokens: int | None = None
    device_chunks: int = 0
    below_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RoutingSpec:
    """What the service's client needs to build a ``RequestKeyer`` giving an engine's exact keys, without
    weights (``Worker.routing_spec``): the checkpoint directory, the engine's resolved ``EngineConfig`` and its
    model fingerprint (so the client never hashes the weights itself)."""

    checkpoint_path: str
    config: Any
    fingerprint: str | None = None


@runtime_checkable
class WorkerEngine(Protocol):
    """What every engine gives the worker."""

    namespace: Namespace
    """The keys' namespace (the device tier's)."""
    chunk_tokens: int

    def request_keys(self, request: dict) -> list[CacheKey]:
        """The chained keys of the request's full prompt chunks; a bad request raises (its own error)."""

    def run(self, request: dict, keys: Sequence[CacheKey], cached: Sequence[Any]) -> EngineRun:
        """Run with ``cached`` (tensors of ``keys[:len(cached)]``; None for chunks its own device tier holds)
        as the reused prefix."""


@runtime_checkable
class DeviceTierEngine(Protocol):
    """An engine that keeps the worker's device tier itself (its ``store``): the worker keeps no copy, fetches
    only the chunks after those it holds, and gives it the node agent as the tier below its store, so what
    its device budget pushes out goes down instead of away."""

    store: Any

    def held_prefix(self, keys: Sequence[CacheKey]) -> int:
        """How many leading ``keys`` the engine's store holds."""

    def attach_below(self, below: Any) -> None:
        """``below``: a ``qwen3vl_ray.engine.budget.TierBelow`` (``actors.worker.AgentBelow``)."""


ENGINE_MEMBERS = ("namespace", "chunk_tokens", "request_keys", "run")
"""``WorkerEngine``'s members, to name the missing ones when an engine does not follow the protocol."""
