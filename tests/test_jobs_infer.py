"""jobs.infer end to end on the tiny checkpoint (real transformers model, no store: runner=plain):
Parquet schema, per-row errors, --fail-on-error, resume, and a SIGKILL halfway through a real job."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import infer
from jobs.output import SCHEMA

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "jobs" / "data"


@pytest.fixture(scope="module")
def ckpt_env(tmp_path_factory):
    """Settings environment with the tiny checkpoint generated once for this module."""
    from qwen3vl_ray.engine.checkpoint import make_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint("tiny", d / "tiny")
    return {"QWEN3VL_RAY_CHECKPOINT_DIR": str(d), "QWEN3VL_RAY_MAX_NEW_TOKENS": "3"}


@pytest.fixture
def dataset(tmp_path):
    """The shipped sample rows plus bad ones: a missing image, a corrupt one, a too-large one, bad messages."""
    shutil.copytree(DATA / "images", tmp_path / "images")
    (tmp_path / "images" / "corrupt.png").write_bytes((DATA / "images" / "waves.png").read_bytes()[:500])
    from PIL import Image

    Image.new("RGB", (1500, 1000)).save(tmp_path / "images" / "huge.png")
    rows = [json.loads(l) for l in (DATA / "prompts.jsonl").read_text().splitlines()][:3]
    rows += [
        {"id": "bad-missing", "prompt": "x", "images": ["images/nope.png"]},
        {"id": "bad-corrupt", "prompt": "x", "images": ["images/corrupt.png"]},
        {"id": "bad-huge", "prompt": "x", "images": ["images/huge.png"]},
        {"id": "bad-messages", "messages": [{"role": "user"}]},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


@pytest.mark.slow
def test_schema_and_per_row_errors(ckpt_env, dataset, tmp_path, monkeypatch, capsys):
    for k, v in ckpt_env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out.parquet"
    argv = ["--input", str(dataset), "--output", str(out), "--runner", "plain", "--batch-size", "2", "--no-progress"]
    assert infer.main(argv + ["--fail-on-error"]) == 1  # bad rows -> non-zero with the flag
    t = pq.read_table(out)
    assert t.schema.equals(SCHEMA)
    rows = {r["id"]: r for r in t.to_pylist()}
    assert list(rows) == ["gradient-describe", "checker-describe", "circles-describe",
                          "bad-missing", "bad-corrupt", "bad-huge", "bad-messages"]
    for rid in ("gradient-describe", "checker-describe", "circles-describe"):
        r = rows[rid]
        assert r["error"] is None and r["completion_tokens"] >= 1 and r["prompt_tokens"] > 40 and r["ttft_s"] > 0
    assert "not found" in rows["bad-missing"]["error"]
    assert "corrupt" in rows["bad-corrupt"]["error"]
    assert "max_pixels" in rows["bad-huge"]["error"]
    assert "content" in rows["bad-messages"]["error"]
    # a rerun finds everything done; without the flag the exit status is 0
    assert infer.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: "))
    assert summary["rows_run"] == 0 and summary["rows_skipped"] == 7 and summary["errors_total"] == 4


@pytest.mark.slow
def test_killed_job_resumes_without_duplicates_or_gaps(ckpt_env, tmp_path):
    # 12 rows, one per part; kill the job after a few parts are durable, then rerun to completion
    src = tmp_path / "in.jsonl"
    shutil.copytree(DATA / "images", tmp_path / "images")
    imgs = ["images/gradient.png", "images/checker.png", "images/circles.png"]
    src.write_text("".join(json.dumps({"id": f"r{i:02d}", "prompt": f"question {i}", "images": [imgs[i % 3]]}) + "\n"
                           for i in range(12)))
    out = tmp_path / "out.parquet"
    cmd = [sys.executable, "-m", "jobs.infer", "--input", str(src), "--output", str(out), "--runner", "plain",
           "--batch-size", "1", "--no-progress"]
    env = {**os.environ, **ckpt_env}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    parts = tmp_path / "out.parquet.parts"
    deadline = time.time() + 120
    while len(list(parts.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "job ended or stalled before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-job: no cleanup, no compaction
    proc.wait()
    assert not out.exists()
    n_before = len(list(parts.glob("part-*.parquet")))
    assert 3 <= n_before < 12

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1].removeprefix("summary: "))
    assert summary["rows_skipped"] >= n_before and summary["rows_skipped"] + summary["rows_run"] == 12
    ids = pq.read_table(out).column("id").to_pylist()
    assert ids == [f"r{i:02d}" for i in range(12)]  # every id once, in input order
    assert not parts.exists()


class InProcessService:
    """The service handle's calls, served in this process by a real WorkerLogic (tiny Qwen3-VL engine, a node
    agent on a LocalObjectStore): keys first, and a row whose keys cannot be computed gets its own error
    result without being sent, as the Ray client (``ServiceHandle.process``) does."""

    def __init__(self, worker):
        self.worker = worker
        self.released = []

    def keys_for(self, request):
        return self.worker.engine.request_keys(request)

    def process(self, requests):
        from actors.worker import error_result

        out = []
        for r in requests:
            try:
                self.keys_for(r)
            except Exception as exc:
                out.append(error_result(r, f"{type(exc).__name__}: {exc}"))
                continue
            out.append(self.worker.process(r))
        return out

    def release(self, session_id):
        self.released.append(session_id)


def test_service_runner_rows_carry_tokens_tiers_and_a_bad_rows_own_error(ckpt_env, tmp_path):
    from actors.config import AgentConfig, CoordinatorConfig, WorkerConfig
    from actors.coordinator import CoordinatorLogic
    from actors.engine_adapter import Qwen3VLEngineAdapter
    from actors.node_agent import NodeAgentLogic
    from actors.object_store_tier import LocalObjectStore
    from actors.worker import WorkerLogic
    from jobs.dataset import Item
    from jobs.service_runner import ServiceRunner
    from qwen3vl_ray import settings as S

    node = "a" * 32
    agent = NodeAgentLogic(node, AgentConfig(host_bytes=64 << 20, disk_bytes=0, policy="lru"), LocalObjectStore())
    coord = CoordinatorLogic(CoordinatorConfig(recompress_codec="", period_s=0))
    coord.add_agent(node, agent)
    ckpt = os.path.join(ckpt_env["QWEN3VL_RAY_CHECKPOINT_DIR"], "tiny")
    engine = Qwen3VLEngineAdapter(checkpoint_path=ckpt, chunk_tokens=16, device_tier_bytes=64 << 20)
    worker = WorkerLogic("w0", node, engine, {node: agent}.__getitem__, coord, agent.store, WorkerConfig(device_bytes=0))
    runner = object.__new__(ServiceRunner)  # everything but the Ray attach in __init__
    runner.settings = S.resolve({"max_new_tokens": 3}, env={})
    runner.handle = InProcessService(worker)

    png = (DATA / "images" / "waves.png").read_bytes()

    def item(rid, image):
        return Item(rid, [{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": "What is in this picture, in detail?"}]}])

    rows = runner.run([item("ok-1", png), item("bad", png[:500]), item("ok-2", png)])
    assert [r["id"] for r in rows] == ["ok-1", "bad", "ok-2"]
    assert "corrupt" in rows[1]["error"] and rows[1]["text"] is None
    for r in (rows[0], rows[2]):
        assert r["error"] is None and r["text"] and r["prompt_tokens"] > 16 and r["completion_tokens"] == 3
        assert r["ttft_s"] > 0 and set(SCHEMA.names) <= set(r)
    assert rows[0]["cached_tokens"] == 0 and rows[0]["tier"] is None
    # the same prompt again: its prefix is in the worker's own (engine) device tier
    assert rows[2]["cached_tokens"] > 0 and rows[2]["tier"] == "device"
    assert rows[2]["text"] == rows[0]["text"]
    # a bad request that reaches the worker is an error result there, and its row's error
    from jobs.rows import service_row

    row = service_row("bad-2", worker.process({"id": "bad-2", "messages": item("bad-2", png[:500]).messages}))
    assert "corrupt" in row["error"] and row["prompt_tokens"] is None


def test_status_merges_the_agents_served_hits_per_tier():
    from actors.pressure_report import NodeReport, TierReport
    from jobs.service_runner import _merge_stats

    merged = _merge_stats(NodeReport("n" * 32, "e", {"host": TierReport(1, 8, 1, 0.9, 0.75),
                                                     "disk": TierReport(2, 16, 1, 0.9, 0.75)}),
                          {"served": {"hits": {"host": 4, "disk": 1}, "misses": 2}})
    assert merged["tiers"]["host"]["served_hits"] == 4 and merged["tiers"]["disk"]["served_hits"] == 1
    assert merged["served_misses"] == 2
    # looked up host first, then disk: host missed what disk served plus the agent's misses
    assert (merged["tiers"]["host"]["hits"], merged["tiers"]["host"]["misses"]) == (4, 3)
    assert (merged["tiers"]["disk"]["hits"], merged["tiers"]["disk"]["misses"]) == (1, 2)
    from jobs.status import render_status

    table = render_status({"coordinator": {"entries": 5}, "nodes": {"n" * 32: merged}})
    host_row = next(line for line in table.splitlines() if " host " in line)
    assert "57%" in host_row  # 4 / (4 + 3), not "-"
    assert "33%" in next(line for line in table.splitlines() if " disk " in line)


def test_the_in_process_engine_refuses_an_idle_ttl_it_would_never_apply(monkeypatch):
    from jobs.runner import EngineRunner
    from qwen3vl_ray import settings as S
    from qwen3vl_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"idle_ttl_s: the in-process engine \(no node agents\) cannot honour"):
        EngineRunner(S.resolve({"idle_ttl_s": 60.0}))
    monkeypatch.setenv("QWEN3VL_RAY_IDLE_TTL_S", "30")
    with pytest.raises(ConfigError, match="QWEN3VL_RAY_IDLE_TTL_S"):
        EngineRunner(S.resolve())
