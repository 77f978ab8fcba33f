"""Job-level metrics of ``jobs.infer`` (rows, tokens, cached tokens by tier, TTFT), exported through
``ray.util.metrics`` when the job runs on Ray, so a batch job's progress shows in the dashboard's Grafana
panels next to the service's ``qwen3vl_ray_*`` store metrics. Without Ray (``--runner engine|plain`` by
hand) there is nowhere to export to, and ``JobMetrics.create`` returns None."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

TTFT_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class JobMetrics:
    def __init__(self, job: str):
        from ray.util.metrics import Counter, Histogram

        self.tags = {"job": job}
        self.rows = Counter("qwen3vl_ray_job_rows", "Rows finished by jobs.infer", tag_keys=("job", "status"))
        self.prompt = Counter("qwen3vl_ray_job_prompt_tokens", "Prompt tokens of finished rows", tag_keys=("job",))
        self.cached = Counter("qwen3vl_ray_job_cached_tokens", "Prompt tokens served from the store, by tier",
                              tag_keys=("job", "tier"))
        self.ttft = Histogram("qwen3vl_ray_job_ttft_seconds", "Time to first token of finished rows",
                              boundaries=TTFT_BOUNDARIES, tag_keys=("job",))

    @classmethod
    def create(cls, job: str) -> "JobMetrics | None":
        try:
            import ray

            if not ray.is_initialized():
                return None
            return cls(job)
        except Exception:  # metrics must never fail a job
            logger.warning("job metrics unavailable", exc_info=True)
            return None

    def record(self, rows: list[dict]) -> None:
        for r in rows:
            ok = r.get("error") is None
            self.rows.inc(1, tags={**self.tags, "status": "ok" if ok else "error"})
            if not ok:
                continue
            if r.get("prompt_tokens"):
                self.prompt.inc(r["prompt_tokens"], tags=self.tags)
            for tier, n in (r.get("cached_tiers") or {}).items():
                if n:
                    self.cached.inc(n, tags={**self.tags, "tier": str(tier)})
            if r.get("ttft_s") is not None:
                self.ttft.observe(r["ttft_s"], tags=self.tags)

    def flush(self) -> None:
        """Wait for one export interval so the final counts leave this process before it exits (the core
        worker exports metrics periodically, every ``metrics_report_interval_ms``, and not on exit)."""
        import time

        import ray

        interval_s = max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0
        time.sleep(interval_s * 1.5)


def attach_for_metrics(address: str | None) -> bool:
    """Inside ``ray job submit`` (``RAY_ADDRESS`` set) or with ``--address``, attach to the cluster even when
    the runner itself needs no Ray (engine, plain), so the job's metrics reach the cluster's Prometheus."""
    import os

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return False
    import ray

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    return True
