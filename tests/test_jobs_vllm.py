"""``python -m jobs.infer`` on its default runner, Ray Data LLM + vLLM with the KV connector on the node agents.

1. Embedded Ray: text rows, an image row and two bad rows (one the driver refuses, one vLLM refuses); the bad
   rows alone have errors, and each answer equals what vLLM alone answers for the same chat. vLLM alone is
   the reference, not ``--runner plain``: the
   transformers model and vLLM's CPU kernels compute the same float32 logits in another order, and greedy
   decoding on random weights can break a near tie either way; vLLM against vLLM must agree token for token.
   A rerun into the same output skips every done row and starts nothing.
2. ``ray job submit`` twice to a token-auth head started here, the same prompts into two outputs: the second
   run's engine loads the first run's blocks from the node agents (the agents count those hits; Ray Data LLM
   reports no per-row ``cached_tokens``, so the rows hold null there) and answers the same.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.ray_head import BIN, RAY, running_head

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
# longer than one 32-token block: its full blocks are what a second run finds on the agents
LONG = "You are a careful assistant who answers in one short sentence. " * 8 + "Say hello."
ROWS = [{"id": "long", "prompt": LONG},
        {"id": "short", "messages": [{"role": "user", "content": "What is two plus two?"}]},
        {"id": "image", "prompt": "Describe the image.", "images": ["checker.png"]},
        {"id": "bad", "prompt": "x", "images": ["missing.png"]},  # refused on the driver (jobs.dataset)
        {"id": "too_long", "prompt": "word " * 5000}]  # refused by vLLM (max_model_len 4096): the engine's error
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "checker.png").write_bytes((ROOT / "jobs/data/images/checker.png").read_bytes())
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return d


@pytest.fixture(scope="module")
def job_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("job")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "QWEN3VL_RAY_CHECKPOINT_DIR": str(d / "ckpt"), "QWEN3VL_RAY_DISK_DIR": str(d / "disk"),
            "QWEN3VL_RAY_MAX_NEW_TOKENS": str(MAX_TOKENS), "PYTHONPATH": str(ROOT)}


def _infer(args, env, timeout=900):
    r = subprocess.run([sys.executable, "-m", "jobs.infer", "--model", "tiny", "--num-workers", "1", "--no-progress",
                        *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1].removeprefix("summary: "))


VLLM_ALONE = """
import json, sys
from PIL import Image
from vllm import LLM, SamplingParams
model, image, chats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
llm = LLM(model=model, enforce_eager=True, max_model_len=4096, dtype="float32", block_size=32, seed=0)
pil = Image.open(image).convert("RGB")
chats = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": pil} if p == "IMAGE" else
                                       {"type": "text", "text": p} for p in parts]}] for parts in chats]
outs = llm.chat(chats, SamplingParams(temperature=0, max_tokens=%d), use_tqdm=False)
print("RESULT " + json.dumps([o.outputs[0].text for o in outs]))
""" % MAX_TOKENS


def vllm_alone(model: str, image: Path, chats: list[list[str]], env: dict) -> list[str]:
    """Greedy answers of a plain ``vllm.LLM`` (no connector, no Ray) for single-turn user chats."""
    env = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run([sys.executable, "-c", VLLM_ALONE, model, str(image), json.dumps(chats)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def test_job_rows_errors_answers_of_vllm_alone_and_resume(dataset, job_env, tmp_path):
    out = tmp_path / "out.parquet"
    summary = _infer(["--input", str(dataset / "in.jsonl"), "--output", str(out)], job_env)
    assert summary["rows_run"] == 5 and summary["errors_total"] == 2 and summary["failed_ids"] == ["bad", "too_long"]
    assert summary["cached_tokens"] is None and summary["hit_ratio"] is None  # not reported by Ray Data LLM
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert list(rows) == ["long", "short", "image", "bad", "too_long"]  # input order after compaction
    assert "not found" in rows["bad"]["error"] and rows["bad"]["text"] is None
    # Ray Data LLM's should_continue_on_error: vLLM's exception becomes the row's error, the others run
    assert "maximum context length is 4096" in rows["too_long"]["error"] and rows["too_long"]["text"] is None
    for rid in ("long", "short", "image"):
        row = rows[rid]
        assert row["error"] is None, row
        assert row["completion_tokens"] == MAX_TOKENS and row["prompt_tokens"] > 0 and row["ttft_s"] > 0
        assert row["cached_tokens"] is None
    assert rows["long"]["prompt_tokens"] > 32 and rows["image"]["prompt_tokens"] > rows["short"]["prompt_tokens"]

    # the same chats on vLLM alone: the same greedy answers
    model = str(Path(job_env["QWEN3VL_RAY_CHECKPOINT_DIR"]) / "tiny")
    alone = vllm_alone(model, dataset / "checker.png",
                       [[LONG], ["What is two plus two?"], ["IMAGE", "Describe the image."]], job_env)
    assert [rows[rid]["text"] for rid in ("long", "short", "image")] == alone

    # the text rows alone: a batch without images reaches Ray's chat-template stage as Arrow-backed numpy (a list
    # of parts there once rendered as "<ndarray>", every row the same prompt); the same prompts and answers here
    (dataset / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    _infer(["--input", str(dataset / "text.jsonl"), "--output", str(tmp_path / "text.parquet")], job_env)
    text_rows = {r["id"]: r for r in pq.read_table(tmp_path / "text.parquet").to_pylist()}
    assert ([(text_rows[rid]["prompt_tokens"], text_rows[rid]["text"]) for rid in ("long", "short")]
            == [(rows[rid]["prompt_tokens"], rows[rid]["text"]) for rid in ("long", "short")])

    # a rerun into the same output: every row is done, nothing runs (no Ray, no engine)
    again = _infer(["--input", str(dataset / "in.jsonl"), "--output", str(out)], job_env, timeout=120)
    assert again["rows_run"] == 0 and again["rows_skipped"] == 5 and again["rows_in_output"] == 5
    assert pq.read_table(out).to_pylist() == list(rows.values())


@pytest.fixture(scope="module")
def ray_head(job_env):
    env = {**job_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with running_head(env) as (ports, _):
        yield {"url": f"http://127.0.0.1:{ports['dashboard']}", "gcs": f"127.0.0.1:{ports['gcs']}", "env": env}


def test_ray_job_submit_twice_the_second_run_loads_the_first_runs_blocks_from_the_agents(dataset, ray_head,
                                                                                         tmp_path):
    env_vars = {k: ray_head["env"][k] for k in ("QWEN3VL_RAY_CHECKPOINT_DIR", "QWEN3VL_RAY_DISK_DIR",
                                                 "QWEN3VL_RAY_MAX_NEW_TOKENS")}
    texts = []
    for name in ("first", "second"):
        out = tmp_path / f"{name}.parquet"
        r = subprocess.run([RAY, "job", "submit", "--address", ray_head["url"], "--working-dir", str(ROOT),
                            "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", "python", "-m",
                            "jobs.infer", "--input", str(dataset / "in.jsonl"), "--output", str(out), "--model",
                            "tiny", "--num-workers", "1", "--no-progress"],
                           env=ray_head["env"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0 and "succeeded" in r.stdout + r.stderr, (r.stdout + r.stderr)[-4000:]
        rows = {row["id"]: row for row in pq.read_table(out).to_pylist()}
        assert [rid for rid, row in rows.items() if row["error"]] == ["bad", "too_long"]
        texts.append({rid: row["text"] for rid, row in rows.items()})
        prompt_tokens = rows["long"]["prompt_tokens"]
    # the second run's prompts were served from the first run's KV: the same greedy answers
    assert texts[0] == texts[1]

    # the node agent served blocks: the connector's loads of the second run (the first found nothing)
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "status", "--json", "--address", ray_head["gcs"]],
                       cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    [node] = json.loads(r.stdout)["nodes"].values()
    host = node["tiers"]["host"]
    long_blocks = (prompt_tokens - 1) // 32  # the long prompt's full blocks, its last token left to compute
    assert host["entries"] >= long_blocks > 0, host
    assert host["served_hits"] >= long_blocks, host
