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


def test_error_text_reports_the_remote_cause():
    class RemoteError(Exception):  # shaped like ray.exceptions.RayTaskError: a traceback text and a .cause
        def __init__(self, cause):
            super().__init__("ray::Worker.process() (pid=1)\n  File x.py, line 3\n    boom\nValueError: bad image")
            self.cause = cause

    assert infer.error_text(RemoteError(ValueError("bad image"))) == "ValueError: bad image"
    assert infer.error_text(RuntimeError("a\nb\n")) == "RuntimeError: b"
    assert len(infer.error_text(RuntimeError("x" * 5000))) == 1000
