"""Job-level metrics of ``jobs.infer`` (rows, prompt tokens, cached tokens by tier, TTFT), exported through Ray
when the job runs on Ray, so a batch job's progress shows in the Grafana dashboard's "Jobs" panel next to the
service's ``qwen3vl_ray_*`` store metrics. Without Ray (``--runner engine|plain`` by hand) there is nowhere to
export to, and ``JobMetrics.create`` returns None.

The increments go to the cluster's metrics sink (``actors.metrics.MetricsSink``, a detached actor), not to
this process's own exporter: Ray exports a process's metrics only every ``metrics_report_interval_ms``
(10 s) and not on exit, so a driver recording its own would have to sleep through an export interval before
exiting (15 s measured at the end of every job) or lose its last rows. Sending to a long-lived process costs
one asynchronous call per batch and, at the end, one wait for the last call (milliseconds).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 10.0


def row_ops(job: str, rows: list[dict]) -> list[tuple[str, str, float, dict]]:
    """The metric increments for finished ``rows`` as ``(op, name, value, tags)`` (see ``actors.metrics``)."""
    ops: list[tuple[str, str, float, dict]] = []
    for r in rows:
        ok = r.get("error") is None
        ops.append(("inc", "qwen3vl_ray_job_rows", 1, {"job": job, "status": "ok" if ok else "error"}))
        if not ok:
            continue
        if r.get("prompt_tokens"):
            ops.append(("inc", "qwen3vl_ray_job_prompt_tokens", r["prompt_tokens"], {"job": job}))
        for tier, n in (r.get("cached_tiers") or {}).items():
            if n:
                ops.append(("inc", "qwen3vl_ray_job_cached_tokens", n, {"job": job, "tier": str(tier)}))
        if r.get("ttft_s") is not None:
            ops.append(("observe", "qwen3vl_ray_job_ttft_seconds", r["ttft_s"], {"job": job}))
    return ops


class JobMetrics:
    """Sends a job's row metrics to the cluster's metrics sink, one asynchronous call per batch."""

    def __init__(self, job: str, sink) -> None:
        self.job, self.sink = job, sink
        self._last = None  # the latest record call: flush waits for it (calls to one actor run in order)

    @classmethod
    def create(cls, job: str) -> "JobMetrics | None":
        try:
            import ray

            if not ray.is_initialized():
                return None
            from actors.metrics import get_or_create_sink

            return cls(job, get_or_create_sink())
        except Exception:  # metrics must never fail a job
            logger.warning("job metrics unavailable", exc_info=True)
            return None

    def record(self, rows: list[dict]) -> None:
        ops = row_ops(self.job, rows)
        if ops:
            self._last = self.sink.record.remote(ops)

    def flush(self) -> None:
        """Wait until the sink has recorded everything sent (it exports on Ray's schedule from then on)."""
        if self._last is None:
            return
        import ray

        try:
            ray.get(self._last, timeout=FLUSH_TIMEOUT_S)
        except Exception:  # metrics must never fail a job
            logger.warning("the job's last metrics did not reach the metrics sink in %.0f s", FLUSH_TIMEOUT_S,
                           exc_info=True)
        self._last = None


def attach_for_metrics(address: str | None) -> bool:
    """Inside ``ray job submit`` (``RAY_ADDRESS`` set) or with ``--address``, attach to the cluster even when
    the runner itself needs no Ray (engine, plain), so the job's metrics reach the cluster's Prometheus."""
    import os

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return False
    from actors.service import attach_ray

    attach_ray(address, log_to_driver=False)
    return True
