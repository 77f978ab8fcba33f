"""jobs.infer submitted with the real `ray job submit` CLI to a `ray start --head` started here (token auth
on, as Ray's default), then the Prometheus endpoint shows the qwen3vl_ray_ metrics with non-zero hits.

The head is started with --block in its own process group and stopped with SIGTERM to that group: never
`ray stop`, which would stop every Ray on the machine.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _free_ports(names) -> dict[str, int]:
    """Distinct free ports (all held open until every one is picked, so none is handed out twice)."""
    socks = []
    try:
        for _ in names:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return {name: s.getsockname()[1] for name, s in zip(names, socks)}
    finally:
        for s in socks:
            s.close()


PORT_FLAGS = {"gcs": "--port", "dashboard": "--dashboard-port", "metrics": "--metrics-export-port",
              "agent": "--dashboard-agent-listen-port", "agent_grpc": "--dashboard-agent-grpc-port",
              "runtime_env": "--runtime-env-agent-port", "client": "--ray-client-server-port",
              "node_manager": "--node-manager-port", "object_manager": "--object-manager-port"}


def _start_head(env: dict, temp: str, log) -> tuple[subprocess.Popen, dict[str, int]]:
    """``ray start --head`` with every component's port chosen here: a port Ray picks at random for a
    component left unset can collide with one given here, which Ray refuses at start-up. Such a refusal
    (another process took a port in between) is retried with new ports."""
    for attempt in range(3):
        ports = _free_ports(list(PORT_FLAGS))
        log.seek(0)
        log.truncate()
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", *(f"{PORT_FLAGS[k]}={v}" for k, v in ports.items()),
             f"--temp-dir={temp}", "--num-cpus=2", "--object-store-memory=300000000", "--include-dashboard=true",
             "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=8)  # a port refusal ends it within seconds; a healthy head blocks
        except subprocess.TimeoutExpired:
            return proc, ports
        text = Path(temp, "head.log").read_text()
        if not any(m in text for m in ("port number", "already in use")) or attempt == 2:
            return proc, ports  # exited for another reason: the caller reports its log
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="q3r", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is this venv's
           # as if installed on the node (cluster.yaml pip-installs it): actors started outside a job import it
           "PYTHONPATH": str(ROOT),
           # a test head has nothing to drain on SIGTERM: tear down at once instead of after 30 s
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp, "head.log"), "w")
    proc, ports = _start_head(env, temp, log)
    url = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without the token): up
            except OSError:
                assert proc.poll() is None, Path(temp, "head.log").read_text()[-3000:]
                assert time.time() < deadline, "ray head did not come up in 120 s"
                time.sleep(0.5)
        yield {"url": url, "env": env, "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics", "temp": temp,
               "gcs": f"127.0.0.1:{ports['gcs']}"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:  # anything of this head still up after the grace period (all in its process group)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


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
            "--batch-size", "1"]
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
