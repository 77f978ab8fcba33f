"""Output rows: the one builder every runner's results go through (``jobs.output.SCHEMA``'s columns plus the
per-tier counts the demo and the job metrics read), and the row of a failed request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actors.results import RequestResult

TIER_ORDER = ("device", "host", "disk", "agent", "remote")
"""Tiers from fastest to slowest, the order ``tier_label`` names them in."""


def error_row(item_id: str, error: str) -> dict:
    return {"id": item_id, "text": None, "prompt_tokens": None, "completion_tokens": None,
            "cached_tokens": None, "ttft_s": None, "tier": None, "error": error}


def tier_label(cached_tiers: dict[str, int] | None) -> str | None:
    """Where the cached prompt tokens came from: ``"host"``, ``"device+disk"``, ... or None (nothing cached)."""
    if not cached_tiers:
        return None
    names = [t for t in TIER_ORDER if cached_tiers.get(t)] + sorted(
        t for t, n in cached_tiers.items() if n and t not in TIER_ORDER)
    return "+".join(names) or None


def output_row(item_id: str, *, text: str | None, prompt_tokens: int | None, completion_tokens: int | None,
               cached_tokens: int, ttft_s: float | None, cached_tiers: dict[str, int] | None,
               vision_cache_hits: int) -> dict:
    """A finished request's row; ``cached_tiers`` (reused prompt tokens per tier) is kept beside the columns."""
    tiers = {t: int(n) for t, n in (cached_tiers or {}).items() if n}
    return {
        "id": item_id,
        "text": text,
        "prompt_tokens": int(prompt_tokens) if prompt_tokens is not None else None,
        "completion_tokens": int(completion_tokens) if completion_tokens is not None else None,
        "cached_tokens": int(cached_tokens or 0),
        "ttft_s": float(ttft_s) if ttft_s is not None else None,
        "tier": tier_label(tiers),
        "error": None,
        # not output columns (jobs.output keeps only SCHEMA's): for the demo's summary and job metrics
        "cached_tiers": tiers,
        "vision_cache_hits": int(vision_cache_hits or 0),
    }


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def engine_row(item_id: str, result: Any) -> dict:
    """An in-process engine's ``Result`` (object or dict form) -> its row."""
    error = _get(result, "error")
    if error:
        return error_row(item_id, str(error))
    m = _get(result, "metrics") or result
    token_ids = _get(result, "token_ids")
    return output_row(item_id, text=_get(result, "text"), prompt_tokens=_get(m, "prompt_tokens"),
                      completion_tokens=len(token_ids) if token_ids is not None else None,
                      cached_tokens=_get(m, "cached_tokens", 0), ttft_s=_get(m, "ttft_s", 0.0),
                      cached_tiers=_get(m, "cached_tiers"), vision_cache_hits=_get(m, "vision_cache_hits", 0))


def service_row(item_id: str, r: RequestResult) -> dict:
    """A request's ``actors.results.RequestResult`` (``ServiceHandle.process``) -> its row. The worker reports
    the engine's prompt tokens, generated tokens, TTFT, vision-cache hits and the reused prompt tokens per tier
    (``device``: its own store; ``host``/``disk``: its node agent's; ``remote``: another node's agent)."""
    if r.error:
        return error_row(item_id, str(r.error))
    completion = r.completion_tokens
    if completion is None and r.token_ids is not None:
        completion = len(r.token_ids)
    return output_row(item_id, text=r.output, prompt_tokens=r.prompt_tokens, completion_tokens=completion,
                      cached_tokens=r.cached_tokens, ttft_s=r.ttft_s, cached_tiers=r.cached_tiers,
                      vision_cache_hits=r.vision_cache_hits)
