"""The connector and serving benchmarks run end to end in their quickest modes and print sane JSON.

Speeds are what the benchmarks report, not what the tests assert: the machine is shared, so the checks are on
the rows being there, positive numbers, and the connector's blocks actually moving (hits in the tiers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(module: str, *args: str, timeout: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--json", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_connector_benchmark_measures_every_store_against_memcpy(tmp_path):
    res = run_benchmark("benchmarks.connector", "--dir", str(tmp_path), timeout=600)
    assert res["memcpy_gbps"] > 0
    measured = {(r["store"], r["op"]): r for r in res["rows"] if "refused" not in r}
    # host, int8 host and disk both ways, the disk's cold loads, and the one-copy reference
    for key in [("host", "save"), ("host", "load"), ("host-int8", "save"), ("host-int8", "load"), ("disk", "save"),
                ("disk", "load"), ("disk cold", "load"), ("one copy_", "save"), ("one copy_", "load")]:
        assert key in measured, f"no row {key}"
        assert measured[key]["gbps"] > 0 and measured[key]["vs_memcpy"] > 0
    # a codec that cannot take vLLM's block entry is a row that says why, never a missing row
    assert {r["store"] for r in res["rows"]} >= {"host", "host-kv-int8", "host-int8", "disk"}
    assert res["checks"]["host"] == res["checks"]["disk"] == "bit-identical"
    assert res["counters"]["disk"]["loaded"].get("disk", 0) > 0 and res["counters"]["host"]["loaded"]["host"] > 0
    assert isinstance(res["targets_met"], bool) and set(res["shortfall"]) == {"save", "load"}


def test_serving_benchmark_runs_vllm_alone_and_on_the_tier(tmp_path):
    res = run_benchmark("benchmarks.serving", timeout=1500)
    alone, host = res["reuse"]["vLLM alone"], res["reuse"]["+ host"]
    for row in (alone, host):
        assert "error" not in row, row
        assert row["requests"] > 0 and row["ttft_p50_s"] > 0 and row["ttft_p90_s"] >= row["ttft_p50_s"]
        assert row["req_per_s"] > 0 and row["tok_per_s"] > 0 and row["prompt_tokens"] > 0
    assert alone["external_tokens"] == {}
    # later turns resend their history: with the tier, some of it comes back from the host tier
    assert host["external_tokens"].get("host", 0) > 0 and host["load_failures"] == 0
    assert res["ttft_p50_speedup"] > 0 and res["working_set_vs_kv_cache"] > 0
    miss = res["all_miss"]
    assert "error" not in miss, miss
    assert sum(miss["rows"]["+ host"]["external_tokens"].values()) == 0  # nothing to reuse, nothing loaded
    assert miss["ttft_ratio_median"] > 0 and miss["time_ratio"] > 0
    assert isinstance(res["targets_met"], bool)
