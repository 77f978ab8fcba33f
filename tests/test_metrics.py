"""Metrics without Ray: the table, the recorder, hits and misses in tokens, device-tier gauges, job rows.
(The exported series and every dashboard panel: tests/test_metrics_dashboard.py.)"""

import logging

import pytest

from actors.config import WorkerConfig
from actors.metrics import METRICS, MetricSpec, Metrics, RayMetrics
from actors.synthetic_engine import SyntheticKVEngine
from actors.worker import WorkerLogic
from jobs.metrics import row_ops
from tests.test_actors_logic import NODES, make_cluster


def test_every_metric_is_one_ray_accepts():
    # Ray's own constructors validate names, tags and histogram boundaries (a 0.0 boundary is refused)
    from ray.util import metrics as rm

    for name, spec in METRICS.items():
        if spec.kind == "histogram":
            rm.Histogram(name, description=spec.description, boundaries=list(spec.buckets), tag_keys=spec.tags)
        else:
            getattr(rm, spec.kind.capitalize())(name, description=spec.description, tag_keys=spec.tags)
    with pytest.raises(ValueError, match="positive and increasing"):
        MetricSpec("histogram", "ratio", buckets=(0.0, 0.5, 1.0))
    with pytest.raises(ValueError, match="positive and increasing"):
        MetricSpec("histogram", "ratio", buckets=(0.5, 0.1))
    with pytest.raises(ValueError, match="needs buckets"):
        MetricSpec("histogram", "ratio")


def test_recorder_tags_zero_increments_declarations_and_batches():
    m = Metrics("n1")
    m.inc("qwen3vl_ray_misses", 0)  # nothing to count (Ray's Counter refuses 0): no series
    assert m.values == {}
    m.declare("qwen3vl_ray_evictions")  # a declared counter is a series at 0
    assert m.values == {("qwen3vl_ray_evictions", ("node", "n1"), ("tier", "all")): 0.0}
    m.inc("qwen3vl_ray_evictions", 2)
    m.declare("qwen3vl_ray_evictions")  # declaring again keeps the count
    assert m.total("qwen3vl_ray_evictions") == 2
    with pytest.raises(ValueError, match="only counters"):
        m.declare("qwen3vl_ray_entries")
    # job metrics take their own tags, not node/tier
    m.record([("inc", "qwen3vl_ray_job_rows", 1, {"job": "j", "status": "ok"}),
              ("observe", "qwen3vl_ray_job_ttft_seconds", 0.5, {"job": "j"})])
    assert m.total("qwen3vl_ray_job_rows", job="j") == 1
    with pytest.raises(ValueError, match="takes tags"):
        m.inc("qwen3vl_ray_job_rows", job="j")  # status missing
    with pytest.raises(ValueError, match="takes tags"):
        m.inc("qwen3vl_ray_job_prompt_tokens", 5, job="j", tier="host")
    with pytest.raises(ValueError, match="unknown metric op"):
        m.record([("delete", "qwen3vl_ray_job_rows", 1, {"job": "j", "status": "ok"})])


def test_an_export_failure_is_warned_once_and_never_raised(caplog):
    m = RayMetrics("n1")

    def broken(name):
        raise RuntimeError("exporter down")

    m._metric = broken
    with caplog.at_level(logging.WARNING, logger="actors.metrics"):
        m.inc("qwen3vl_ray_hits", 3, tier="host")
        m.inc("qwen3vl_ray_hits", 3, tier="host")
    assert m.total("qwen3vl_ray_hits") == 6  # still recorded in process
    assert [r.getMessage() for r in caplog.records] == ["metric qwen3vl_ray_hits cannot be exported (warned once)"]


def test_worker_counts_hits_and_misses_in_tokens_and_reports_its_device_tier(tmp_path):
    coord, agents = make_cluster(tmp_path, host_chunks=16)
    engine = SyntheticKVEngine(layers=1, kv_heads=1, head_dim=16, chunk_tokens=16)
    chunk_bytes = 2 * 16 * 16 * 2  # k/v x tokens x head_dim x bf16
    w = WorkerLogic("w0", NODES[0], engine, agents.__getitem__, coord, agents[NODES[0]].store,
                    WorkerConfig(device_bytes=8 * chunk_bytes))
    # a cold request of 4 full chunks + 8 tokens: every one of its 72 tokens is a miss
    cold = w.process({"token_ids": list(range(72))})
    assert cold.cached_tokens == 0
    assert w.metrics.total("qwen3vl_ray_misses") == 72 and w.metrics.total("qwen3vl_ray_hits") == 0
    # the same prompt again: its 4 chunks (64 tokens) are in the worker's own device tier
    warm = w.process({"token_ids": list(range(72))})
    assert warm.cached_tiers == {"device": 64}
    assert w.metrics.total("qwen3vl_ray_hits", tier="device") == 64
    assert w.metrics.total("qwen3vl_ray_misses") == 72 + 8  # the tail that is no full chunk is recomputed
    # the worker's own device tier, as gauges beside the agents' host and disk
    assert w.metrics.total("qwen3vl_ray_bytes_budget", tier="device") == 8 * chunk_bytes
    assert w.metrics.total("qwen3vl_ray_entries", tier="device") == 4
    assert w.metrics.total("qwen3vl_ray_bytes_used", tier="device") == 4 * chunk_bytes
    # another worker on that node without a device tier: the same chunks are host hits, counted in tokens
    w1 = WorkerLogic("w1", NODES[0], engine, agents.__getitem__, coord, agents[NODES[0]].store,
                     WorkerConfig(device_bytes=0))
    assert w1.process({"token_ids": list(range(72))}).cached_tiers == {"host": 64}
    assert w1.metrics.total("qwen3vl_ray_hits", tier="host") == 64 and w1.metrics.total("qwen3vl_ray_misses") == 8
    ratio = ("qwen3vl_ray_cached_token_ratio", ("node", NODES[0]), ("tier", "all"))
    assert w.metrics.observations[ratio] == [0.0, 64 / 72] and w1.metrics.observations[ratio] == [64 / 72]
    # the agent no longer counts hits (chunks) itself: one source, in tokens
    assert agents[NODES[0]].metrics.total("qwen3vl_ray_hits") == 0


def test_job_rows_become_increments_in_tokens():
    rows = [{"error": None, "prompt_tokens": 100, "cached_tiers": {"device": 64, "host": 0}, "ttft_s": 0.2},
            {"error": "ValueError: corrupt image", "prompt_tokens": None, "cached_tiers": {}, "ttft_s": None}]
    assert row_ops("out.parquet", rows) == [
        ("inc", "qwen3vl_ray_job_rows", 1, {"job": "out.parquet", "status": "ok"}),
        ("inc", "qwen3vl_ray_job_prompt_tokens", 100, {"job": "out.parquet"}),
        ("inc", "qwen3vl_ray_job_cached_tokens", 64, {"job": "out.parquet", "tier": "device"}),
        ("observe", "qwen3vl_ray_job_ttft_seconds", 0.2, {"job": "out.parquet"}),
        ("inc", "qwen3vl_ray_job_rows", 1, {"job": "out.parquet", "status": "error"}),
    ]
    m = Metrics()
    m.record(row_ops("out.parquet", rows))  # every op is one the table accepts
    assert m.total("qwen3vl_ray_job_cached_tokens") == 64
