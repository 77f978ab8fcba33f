"""Service and job metrics: one table of names, a plain recorder (testable without Ray), a Ray exporter, and a
detached sink that records for processes too short-lived to export themselves.

Store metrics are named ``qwen3vl_ray_*`` and tagged by ``node`` and ``tier`` (``tier="all"`` where a number
is not per tier); job metrics (``qwen3vl_ray_job_*``, recorded by ``jobs.metrics``) are tagged by ``job``.
Ray exports them on each node's Prometheus endpoint with a ``ray_`` prefix (counters get a ``_total`` suffix);
``dashboards/grafana_qwen3vl_ray.json`` plots every one of them.

Hits and misses count prompt TOKENS, as the jobs' rows do: the worker records, per request, the tokens each
tier served (``device``, ``host``, ``disk``, ``remote`` = another node's agent) and the tokens no tier could
serve (``misses``), so ``hits / (hits + misses)`` is the cached-token share of what was asked.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict
from dataclasses import dataclass

logger = logging.getLogger(__name__)

STORE_TAGS = ("node", "tier")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Ray's Histogram refuses a boundary <= 0; a ratio of 0 (a cold request) falls in the first bucket.
RATIO_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
SINK_NAME = "qwen3vl_ray_metrics_sink"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    kind: str
    """``counter``, ``gauge`` or ``histogram``."""
    description: str
    tags: tuple[str, ...] = STORE_TAGS
    """Every tag key the metric takes (Ray requires a value for each)."""
    buckets: tuple[float, ...] | None = None
    """Histogram boundaries: positive and increasing (what ``ray.util.metrics.Histogram`` accepts)."""

    def __post_init__(self) -> None:
        if self.kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"unknown metric kind {self.kind!r}")
        if (self.kind == "histogram") != (self.buckets is not None):
            raise ValueError("a histogram needs buckets, and only a histogram takes them")
        if self.buckets is not None and (any(b <= 0 or not math.isfinite(b) for b in self.buckets)
                                         or list(self.buckets) != sorted(set(self.buckets))):
            raise ValueError(f"histogram boundaries must be positive and increasing, got {self.buckets}")


def _store(kind: str, desc: str, *extra: str, buckets: tuple[float, ...] | None = None) -> MetricSpec:
    return MetricSpec(kind, desc, STORE_TAGS + extra, buckets)


METRICS: dict[str, MetricSpec] = {
    "qwen3vl_ray_bytes_used": _store("gauge", "Bytes held by a tier (device: a worker's own store)"),
    "qwen3vl_ray_bytes_budget": _store("gauge", "Byte budget of a tier"),
    "qwen3vl_ray_entries": _store("gauge", "Entries held by a tier"),
    "qwen3vl_ray_compression_ratio": _store("gauge", "Logical bytes / stored bytes of a tier"),
    "qwen3vl_ray_hits": _store("counter", "Prompt tokens served by a tier (remote: another node's agent)"),
    "qwen3vl_ray_misses": _store("counter", "Prompt tokens no tier could serve (computed by the engine)"),
    "qwen3vl_ray_promotions": _store("counter", "Entries moved up a tier"),
    "qwen3vl_ray_demotions": _store("counter", "Entries moved down a tier"),
    "qwen3vl_ray_evictions": _store("counter", "Entries dropped from the cluster"),
    "qwen3vl_ray_swap_bytes_in": _store("counter", "Bytes moved into a tier (stores, promotions)"),
    "qwen3vl_ray_swap_bytes_out": _store("counter", "Bytes read out of a tier"),
    "qwen3vl_ray_cross_node_bytes": _store("counter", "Bytes fetched from another node's object store"),
    "qwen3vl_ray_coordinator_actions": _store("counter", "Coordinator policy decisions", "action"),
    "qwen3vl_ray_admissions": _store("counter", "Session admission outcomes", "result"),
    "qwen3vl_ray_requests": _store("counter", "Requests served by workers", "result"),
    "qwen3vl_ray_ttft_seconds": _store("histogram", "Time to first token", buckets=TTFT_BUCKETS),
    "qwen3vl_ray_cached_token_ratio": _store("histogram", "Share of prompt tokens served from cache",
                                             buckets=RATIO_BUCKETS),
    # jobs.infer's progress (jobs.metrics), one series per job (its output file's name)
    "qwen3vl_ray_job_rows": MetricSpec("counter", "Rows finished by jobs.infer", ("job", "status")),
    "qwen3vl_ray_job_prompt_tokens": MetricSpec("counter", "Prompt tokens of finished rows", ("job",)),
    "qwen3vl_ray_job_cached_tokens": MetricSpec("counter", "Prompt tokens served from the store, by tier",
                                                ("job", "tier")),
    "qwen3vl_ray_job_ttft_seconds": MetricSpec("histogram", "Time to first token of finished rows", ("job",),
                                               TTFT_BUCKETS),
}


class Metrics:
    """Records metrics in process memory (what tests read); subclasses also export them."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self._lock = threading.Lock()
        self.values: dict[tuple, float] = defaultdict(float)
        self.observations: dict[tuple, list[float]] = defaultdict(list)

    def _key(self, name: str, tags: dict) -> tuple:
        spec = METRICS.get(name)
        if spec is None:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
        defaults = {"node": self.node, "tier": "all"}
        tags = {**{k: defaults[k] for k in spec.tags if k in defaults}, **tags}
        if set(tags) != set(spec.tags):
            raise ValueError(f"metric {name} takes tags {spec.tags}, got {sorted(tags)}")
        return (name,) + tuple(sorted((k, str(v)) for k, v in tags.items()))

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        key = self._key(name, tags)
        if value <= 0:  # Ray's Counter refuses it; nothing to count
            return
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

    def declare(self, name: str, **tags: str) -> None:
        """Export a counter at 0 before its first event, so ``rate()`` reads 0 instead of no data (Prometheus
        practice for known label sets: a panel of rare events, such as evictions, is then a flat line, not
        "No data" that looks like a broken exporter)."""
        if METRICS[name].kind != "counter":
            raise ValueError(f"only counters are declared; {name} is a {METRICS[name].kind}")
        key = self._key(name, tags)
        with self._lock:
            if key in self.values:
                return
            self.values[key] = 0.0
        self._export(name, "declare", 0.0, dict(key[1:]))

    def record(self, ops: list[tuple[str, str, float, dict]]) -> None:
        """Apply many ``(op, name, value, tags)`` at once (``op``: inc, set or observe)."""
        for op, name, value, tags in ops:
            if op not in ("inc", "set", "observe"):
                raise ValueError(f"unknown metric op {op!r}")
            getattr(self, op)(name, value, **tags)

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
        self._failed: set[str] = set()

    def _metric(self, name: str):
        m = self._ray.get(name)
        if m is None:
            from ray.util import metrics as rm

            spec = METRICS[name]
            if spec.kind == "counter":
                m = rm.Counter(name, description=spec.description, tag_keys=spec.tags)
            elif spec.kind == "gauge":
                m = rm.Gauge(name, description=spec.description, tag_keys=spec.tags)
            else:
                m = rm.Histogram(name, description=spec.description, boundaries=list(spec.buckets),
                                 tag_keys=spec.tags)
            self._ray[name] = m
        return m

    def _export(self, name: str, op: str, value: float, tags: dict) -> None:
        try:
            m = self._metric(name)
            if op == "declare":
                # Counter.inc refuses 0; _record is what inc calls after that check (Ray 2.60)
                m._record(0.0, tags=tags)
            else:
                getattr(m, op)(value, tags=tags)
        except Exception:  # metrics must never break serving, but a metric that never exports must be seen
            if name not in self._failed:
                self._failed.add(name)
                logger.warning("metric %s cannot be exported (warned once)", name, exc_info=True)


class MetricsSink:
    """Ray actor (named, detached, no CPU): records metrics sent by processes that end before Ray exports.

    Ray's core worker exports a process's metrics every ``metrics_report_interval_ms`` (10 s) and not on exit,
    so a job's driver that recorded its last rows just before exiting would lose them unless it slept for an
    export interval (what ``jobs.metrics`` did: a 15 s stall at the end of every job). The job sends its
    increments here instead; this long-lived process exports them on Ray's own schedule."""

    def __init__(self) -> None:
        import ray

        self.metrics = RayMetrics(ray.get_runtime_context().get_node_id())

    def record(self, ops: list[tuple[str, str, float, dict]]) -> int:
        self.metrics.record(ops)
        return len(ops)


def get_or_create_sink():
    """The cluster's metrics sink (created on first use, then shared by every job). It is placed on the
    creating driver's node (the head, for ``ray job submit``): holding no resources, it would not keep an
    autoscaled GPU node up, and a restart elsewhere resets its counters."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.config import NAMESPACE

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(MetricsSink).options(name=SINK_NAME, namespace=NAMESPACE, lifetime="detached",
                                           get_if_exists=True, num_cpus=0, max_restarts=-1,
                                           scheduling_strategy=here).remote()
