"""The KV connector's metrics in vLLM's conventions: stats travel with vLLM's own, metrics are ``vllm:*``.

A worker-side connector returns :class:`TierConnectorStats` from ``get_kv_connector_stats``; vLLM carries them
to its stat loggers, which call :class:`TierConnectorPromMetrics` (through the connector's
``build_prom_metrics``). Under Ray Serve LLM and Ray Data LLM, vLLM's loggers write Ray metrics, so these
appear beside ``vllm:external_prefix_cache_hits`` (the connector's hits, in tokens, that vLLM counts itself)
on every node's metrics endpoint and in the Ray dashboard:

- ``vllm:qwen3vl_ray_loaded_tokens{tier}``: tokens loaded from each tier (``host``, ``disk``, ``remote``);
- ``vllm:qwen3vl_ray_load_bytes`` / ``vllm:qwen3vl_ray_load_seconds``: load bandwidth is their rates' ratio;
- ``vllm:qwen3vl_ray_saved_tokens``, ``vllm:qwen3vl_ray_save_bytes``, ``vllm:qwen3vl_ray_save_seconds``
  (with asynchronous saves, the blocks a step hands to the tiers, counted in that step; a block the store then
  refuses shows in the store's own counters);
- ``vllm:qwen3vl_ray_load_failures``: blocks that could not be loaded and were recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

PREFIX = "vllm:qwen3vl_ray_"
_SCALARS = ("load_bytes", "load_seconds", "saved_tokens", "save_bytes", "save_seconds", "load_failures")


def _empty() -> dict[str, Any]:
    return {"loaded_tokens": {}, **{name: 0 for name in _SCALARS}}


@dataclass
class TierConnectorStats(KVConnectorStats):
    """What one worker moved since its last report (``data``: plain numbers, so vLLM can ship it)."""

    data: dict[str, Any] = field(default_factory=_empty)

    def record_load(self, tokens_per_tier: dict[str, int], nbytes: int, seconds: float, failures: int) -> None:
        for tier, n in tokens_per_tier.items():
            self.data["loaded_tokens"][tier] = self.data["loaded_tokens"].get(tier, 0) + n
        self.data["load_bytes"] += nbytes
        self.data["load_seconds"] += seconds
        self.data["load_failures"] += failures

    def record_save(self, tokens: int, nbytes: int, seconds: float) -> None:
        self.data["saved_tokens"] += tokens
        self.data["save_bytes"] += nbytes
        self.data["save_seconds"] += seconds

    def reset(self) -> None:
        self.data = _empty()

    def aggregate(self, other: KVConnectorStats) -> "TierConnectorStats":
        other_data = other.data if other is not None else {}
        for tier, n in other_data.get("loaded_tokens", {}).items():
            self.data["loaded_tokens"][tier] = self.data["loaded_tokens"].get(tier, 0) + n
        for name in _SCALARS:
            self.data[name] += other_data.get(name, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {f"loaded_tokens_{t}": n for t, n in sorted(d["loaded_tokens"].items())}
        out.update(saved_tokens=d["saved_tokens"], load_failures=d["load_failures"])
        out["load_GBps"] = round(d["load_bytes"] / d["load_seconds"] / 1e9, 3) if d["load_seconds"] else 0.0
        out["save_GBps"] = round(d["save_bytes"] / d["save_seconds"] / 1e9, 3) if d["save_seconds"] else 0.0
        return out

    def is_empty(self) -> bool:
        return not self.data["loaded_tokens"] and not any(self.data[name] for name in _SCALARS)


class TierConnectorPromMetrics(KVConnectorPromMetrics):
    """Counters per engine (vLLM's ``engine`` label values), ``tier`` for loads."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        docs = {
            "load_bytes": "Bytes of KV loaded from the qwen3vl-ray tiers into vLLM's paged KV.",
            "load_seconds": "Seconds spent loading KV from the qwen3vl-ray tiers.",
            "saved_tokens": "Tokens of KV saved to the qwen3vl-ray tiers.",
            "save_bytes": "Bytes of KV saved to the qwen3vl-ray tiers.",
            "save_seconds": "Seconds spent saving KV to the qwen3vl-ray tiers.",
            "load_failures": "KV blocks that failed to load from the qwen3vl-ray tiers (recomputed).",
        }
        self._scalars = {name: self._counter_cls(name=PREFIX + name, documentation=doc, labelnames=labelnames)
                         for name, doc in docs.items()}
        self._loaded = self._counter_cls(name=PREFIX + "loaded_tokens",
                                         documentation="Tokens of KV loaded from each qwen3vl-ray tier.",
                                         labelnames=labelnames + ["tier"])

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for tier, n in transfer_stats_data.get("loaded_tokens", {}).items():
            if n:
                self._loaded.labels(*labels, tier).inc(n)
        for name, counter in self._scalars.items():
            value = transfer_stats_data.get(name, 0)
            if value:
                counter.labels(*labels).inc(value)
