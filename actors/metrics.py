"""Service metrics: one table of names, a plain recorder (testable without Ray) and a Ray exporter.

Every metric is named ``qwen3vl_ray_*`` and tagged by ``node`` and ``tier`` (``tier="all"`` where a number
is not per tier). Ray exports them on each node's Prometheus endpoint with a ``ray_`` prefix (counters get a
``_total`` suffix); ``dashboards/grafana_qwen3vl_ray.json`` plots them.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

logger = logging.getLogger(__name__)

TAGS = ("node", "tier")
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
RATIO_BUCKETS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]

#: name -> (kind, description, extra tag keys, histogram boundaries)
METRICS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "qwen3vl_ray_bytes_used": ("gauge", "Bytes held by a tier", (), None),
    "qwen3vl_ray_bytes_budget": ("gauge", "Byte budget of a tier", (), None),
    "qwen3vl_ray_entries": ("gauge", "Entries held by a tier", (), None),
    "qwen3vl_ray_compression_ratio": ("gauge", "Logical bytes / stored bytes of a tier", (), None),
    "qwen3vl_ray_hits": ("counter", "Chunk lookups served by a tier", (), None),
    "qwen3vl_ray_misses": ("counter", "Chunk lookups no tier could serve", (), None),
    "qwen3vl_ray_promotions": ("counter", "Entries moved up a tier", (), None),
    "qwen3vl_ray_demotions": ("counter", "Entries moved down a tier", (), None),
    "qwen3vl_ray_evictions": ("counter", "Entries dropped from the cluster", (), None),
    "qwen3vl_ray_swap_bytes_in": ("counter", "Bytes moved into a tier (stores, promotions)", (), None),
    "qwen3vl_ray_swap_bytes_out": ("counter", "Bytes read out of a tier", (), None),
    "qwen3vl_ray_cross_node_bytes": ("counter", "Bytes fetched from another node's object store", (), None),
    "qwen3vl_ray_coordinator_actions": ("counter", "Coordinator policy decisions", ("action",), None),
    "qwen3vl_ray_admissions": ("counter", "Session admission outcomes", ("result",), None),
    "qwen3vl_ray_requests": ("counter", "Requests served by workers", ("result",), None),
    "qwen3vl_ray_ttft_seconds": ("histogram", "Time to first token", (), TTFT_BUCKETS),
    "qwen3vl_ray_cached_token_ratio": ("histogram", "Share of prompt tokens served from cache", (), RATIO_BUCKETS),
}


class Metrics:
    """Records metrics in process memory (what tests read); subclasses also export them."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self._lock = threading.Lock()
        self.values: dict[tuple, float] = defaultdict(float)
        self.observations: dict[tuple, list[float]] = defaultdict(list)

    def _key(self, name: str, tags: dict) -> tuple:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
        extra = METRICS[name][2]
        tags = {"node": self.node, "tier": "all", **tags}
        unknown = set(tags) - set(TAGS) - set(extra)
        if unknown:
            raise ValueError(f"metric {name} takes tags {TAGS + extra}, got {sorted(unknown)}")
        return (name,) + tuple(sorted(tags.items()))

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        key = self._key(name, tags)
        with self._lock:
            self.values[key] += value
        self._export(name, "inc", value, dict(key[1:]))

    def set(self, name: str, value: float, **tags: str) -> None:
        key = self._key(name, tags)
        with self._lock:
            self.values[key] = value
        self._export(name, "set", value, dict(key[1:]))

    def observe(self, name: str, value: float, **tags: str) -> None:
        key = self._key(name, tags)
        with self._lock:
            self.observations[key].append(value)
            del self.observations[key][:-1000]  # keep memory bounded
        self._export(name, "observe", value, dict(key[1:]))

    def total(self, name: str, **match: str) -> float:
        """Sum of a counter/gauge over all tag sets that match ``match``."""
        with self._lock:
            return sum(v for k, v in self.values.items() if k[0] == name and all((t, match[t]) in k[1:] for t in match))

    def _export(self, name: str, op: str, value: float, tags: dict) -> None:  # noqa: B027 - hook
        pass


class RayMetrics(Metrics):
    """Also exports through ``ray.util.metrics`` (call only inside a Ray worker or driver)."""

    def __init__(self, node: str = "") -> None:
        super().__init__(node)
        self._ray: dict[str, object] = {}

    def _metric(self, name: str):
        m = self._ray.get(name)
        if m is None:
            from ray.util import metrics as rm

            kind, desc, extra, buckets = METRICS[name]
            keys = TAGS + extra
            if kind == "counter":
                m = rm.Counter(name, description=desc, tag_keys=keys)
            elif kind == "gauge":
                m = rm.Gauge(name, description=desc, tag_keys=keys)
            else:
                m = rm.Histogram(name, description=desc, boundaries=buckets, tag_keys=keys)
            self._ray[name] = m
        return m

    def _export(self, name: str, op: str, value: float, tags: dict) -> None:
        try:
            getattr(self._metric(name), op)(value, tags=tags)
        except Exception:  # metrics must never break serving
            logger.debug("metric %s export failed", name, exc_info=True)
