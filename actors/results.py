"""A request's result as the service hands it back (``WorkerLogic.process``, ``ServiceHandle.process``).

Kept apart from the worker so the client's logic (``actors.service_logic``) builds the same shape without the
worker's imports.
"""

from __future__ import annotations

from typing import Any


def error_result(request: Any, error: str, worker: str | None = None, node: str | None = None) -> dict:
    """The result of a request that failed on its own (bad input, no room): ``error`` set, the rest empty.
    The same shape whether a worker or the client (``actors.service``) rejected it."""
    return {"id": request.get("id") if isinstance(request, dict) else None, "worker": worker, "node": node,
            "output": None, "error": error, "prompt_tokens": None, "completion_tokens": None, "cached_tokens": None,
            "cached_tiers": {}, "vision_cache_hits": 0, "ttft_s": None, "token_ids": None}
