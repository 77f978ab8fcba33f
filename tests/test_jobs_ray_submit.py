"""jobs.infer submitted with the real `ray job submit` CLI to a `ray start --head` started here (token auth
on, as Ray's default), then the Prometheus endpoint shows the qwen3vl_ray_ metrics with non-zero hits.

The head is ``tests.ray_head.running_head``: its own process group, stopped without `ray stop`.
"""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.ray_head import BIN, RAY, running_head

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head():
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is this venv's
           # as if installed on the node (cluster.yaml pip-installs it): actors started outside a job import it
           "PYTHONPATH": str(ROOT)}
    with running_head(env) as (ports, temp):
        yield {"url": f"http://127.0.0.1:{ports['dashboard']}", "env": {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
               "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics", "temp": temp,
               "gcs": f"127.0.0.1:{ports['gcs']}"}


@pytest.fixture(scope="module")
def service_env(tmp_path_factory):
    """Settings shared by every job and CLI call of this module: the service's actors live as long as the head
    and refuse a caller asking for another configuration, so all of them must ask for the same one. The
    worker's device tier holds only a few 32 KiB chunks, so a second pass fetches most of its prefixes from
    the node agent's host tier."""
    d = tmp_path_factory.mktemp("service")
    return {"QWEN3VL_RAY_CHECKPOINT_DIR": str(d / "ckpt"), "QWEN3VL_RAY_DISK_DIR": str(d / "disk"),
            "QWEN3VL_RAY_CHUNK_TOKENS": "32", "QWEN3VL_RAY_BLOCK_BYTES": "64KiB", "QWEN3VL_RAY_DEVICE_BYTES": "128KiB",
            "QWEN3VL_RAY_HOST_BYTES": "64MiB", "QWEN3VL_RAY_DISK_BYTES": "128MiB"}


def _submit(head, args, env_vars):
    cmd = [RAY, "job", "submit", "--address", head["url"], "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", "python", "-m", "jobs.infer", *args]
    return subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=600)


def test_submit_without_token_is_refused(ray_head):
    env = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["RAY_AUTH_MODE"] = "disabled"
    r = subprocess.run([RAY, "job", "list", "--address", ray_head["url"]], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0


def _metric_total(metrics_text: str, name: str) -> float:
    """Sum of every series of the Prometheus counter ``ray_<name>`` (any tags)."""
    total = 0.0
    for line in metrics_text.splitlines():
        m = re.match(r"^ray_%s(?:_total)?\{[^}]*\}\s+([0-9.eE+-]+)$" % re.escape(name), line)
        if m:
            total += float(m.group(1))
    return total


# runner -> the counters that must be non-zero after a warm run:
#   engine: the engine runs in the job's driver; its store's disk tier survives between jobs, and the job
#           exports qwen3vl_ray_job_* metrics;
#   service: the Ray service's agents count store hits per tier (qwen3vl_ray_hits).
EXPECTED = {"engine": ["qwen3vl_ray_job_cached_tokens"],
            "service": ["qwen3vl_ray_hits", "qwen3vl_ray_job_cached_tokens"]}


@pytest.mark.parametrize("runner", ["engine", "service"])
def test_infer_job_with_ray_job_submit_and_prometheus_metrics(ray_head, service_env, tmp_path, runner):
    shutil.copytree(ROOT / "jobs" / "data" / "images", tmp_path / "images")
    shutil.copy(ROOT / "jobs" / "data" / "prompts.jsonl", tmp_path / "in.jsonl")
    env_vars = {**service_env, "QWEN3VL_RAY_MAX_NEW_TOKENS": "3"}
    common = ["--input", str(tmp_path / "in.jsonl"), "--model", "tiny", "--no-progress", "--num-workers", "1",
              "--runner", runner]
    # the same dataset twice: the second run is served from the store
    for name in ("cold", "warm"):
        r = _submit(ray_head, common + ["--output", str(tmp_path / f"{name}.parquet")], env_vars)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        assert "succeeded" in (r.stdout + r.stderr)
    warm = pq.read_table(tmp_path / "warm.parquet").to_pylist()
    assert len(warm) == 8 and all(row["error"] is None for row in warm)
    assert sum(row["cached_tokens"] for row in warm) > 0
    # the head's Prometheus endpoint: the project's metrics with non-zero hits (export is periodic)
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        text = urllib.request.urlopen(ray_head["metrics"], timeout=10).read().decode()
        if all(_metric_total(text, n) > 0 for n in EXPECTED[runner]):
            break
        time.sleep(3)
    assert "ray_qwen3vl_ray_" in text
    for name in EXPECTED[runner]:
        assert _metric_total(text, name) > 0, name


def test_service_then_status_shows_each_node_and_tier(ray_head, service_env, tmp_path):
    # `qwen3vl-ray service` (what cluster.yaml runs on the head) creates or reuses the actors; `status` reads them
    env = {**ray_head["env"], **service_env}
    cli = [sys.executable, "-m", "jobs.cli"]
    r = subprocess.run(cli + ["service", "--address", ray_head["gcs"], "--num-workers", "1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads(r.stdout)["nodes"]
    # a job through the service, then its agents' hits show as a hit ratio
    shutil.copytree(ROOT / "jobs" / "data" / "images", tmp_path / "images")
    shutil.copy(ROOT / "jobs" / "data" / "prompts.jsonl", tmp_path / "in.jsonl")
    for name in ("cold", "warm"):
        r = _submit(ray_head, ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / f"{name}.parquet"),
                               "--model", "tiny", "--no-progress", "--num-workers", "1", "--runner", "service"],
                    {**service_env, "QWEN3VL_RAY_MAX_NEW_TOKENS": "2"})
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    r = subprocess.run(cli + ["status", "--address", ray_head["gcs"]], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "1 node(s)" in r.stdout
    for word in ("host", "disk", "used / budget", "pressure", "qwen3vl_ray_worker_0"):
        assert word in r.stdout, word
    host = next(line for line in r.stdout.splitlines() if " host " in line)
    assert len(re.findall(r"\d+%", host)) == 2, host  # the hit ratio and the pressure: the ratio is not "-"

    # the same service names with another model configuration: refused, naming the differing fields
    r = subprocess.run(cli + ["service", "--address", ray_head["gcs"], "--num-workers", "1"], cwd=ROOT,
                       env={**env, "QWEN3VL_RAY_CHUNK_TOKENS": "64"}, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "engine_args" in (r.stdout + r.stderr), (r.stdout + r.stderr)[-3000:]


def test_stopped_job_resumes_without_duplicates_or_gaps(ray_head, service_env, tmp_path):
    # `ray job stop` halfway through (SIGTERM to the driver), then the same job again: every id once
    shutil.copytree(ROOT / "jobs" / "data" / "images", tmp_path / "images")
    imgs = ["images/gradient.png", "images/checker.png", "images/circles.png", "images/waves.png"]
    n = 80
    (tmp_path / "in.jsonl").write_text("".join(
        json.dumps({"id": f"r{i:03d}", "prompt": f"question {i}", "images": [imgs[i % 4]]}) + "\n" for i in range(n)))
    env_vars = {**service_env, "QWEN3VL_RAY_MAX_NEW_TOKENS": "48"}
    out = tmp_path / "out.parquet"
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model", "tiny", "--no-progress",
            "--batch-size", "1", "--runner", "service"]
    sub = subprocess.run([RAY, "job", "submit", "--no-wait", "--address", ray_head["url"], "--working-dir", str(ROOT),
                          "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", "python", "-m", "jobs.infer",
                          *args], env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert sub.returncode == 0, sub.stderr[-3000:]
    job_id = re.search(r"(raysubmit_\w+)", sub.stdout + sub.stderr).group(1)
    parts = tmp_path / "out.parquet.parts"
    deadline = time.time() + 300
    while len(list(parts.glob("part-*.parquet"))) < 3:
        assert time.time() < deadline and not out.exists(), "job finished or stalled before the stop"
        time.sleep(0.2)
    stop = subprocess.run([RAY, "job", "stop", "--address", ray_head["url"], job_id], env=ray_head["env"],
                          capture_output=True, text=True, timeout=300)
    assert stop.returncode == 0, stop.stderr[-3000:]
    assert not out.exists()
    n_parts = len(list(parts.glob("part-*.parquet")))
    assert 3 <= n_parts < n

    r = _submit(ray_head, args, env_vars)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ids = pq.read_table(out).column("id").to_pylist()
    assert ids == [f"r{i:03d}" for i in range(n)]
    assert not parts.exists()
