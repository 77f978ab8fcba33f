"""vLLM with qwen3vl-ray as its KV tier (``qwen3vl_ray.serving``), on the ``tiny`` checkpoint, fp32, CPU.

Every engine runs in its own process (``tests/vllm_driver.py``), as a user's would: outputs are compared
across processes, and a second process finds what the first one stored only through the disk tier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen3vl_ray.engine.checkpoint import make_checkpoint

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BLOCK = 32  # the CPU attention backend's smallest block size
TEXT = ("Tiered KV caches keep the prefix of a long conversation in host memory and on NVMe so that the "
        "next turn does not recompute it. ") * 4


def _image(path: Path, seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-assets")
    return {
        "model": str(make_checkpoint("tiny", root / "tiny")),
        "other_model": str(make_checkpoint("tiny", root / "tiny-seed1", seed=1)),
        "image_a": _image(root / "a.png", 1),
        "image_b": _image(root / "b.png", 2),
    }


def _connector(tmp_path: Path, **options) -> dict:
    disk = tmp_path / "kv"
    disk.mkdir(mode=0o700, exist_ok=True)
    return {"host_bytes": "64MiB", "disk_bytes": "256MiB", "disk_dir": str(disk / "disk-tier"), **options}


def run_engine(tmp_path: Path, model: str, conversations: list, connector: dict | None, reset: bool = True,
               encoder_cache: dict | None = None, metrics: bool = False, **extra) -> dict:
    """Start one engine process, run the conversations; returns ``turns`` (per conversation, per turn: tokens,
    cached, prompt length), ``batch`` and ``store`` (the connector store's counters; empty without the
    connector). ``extra``: more keys of the driver's spec (``tests/vllm_driver.py``)."""
    spec = tmp_path / f"spec-{os.urandom(4).hex()}.json"
    spec.write_text(json.dumps({"model": model, "connector": connector, "conversations": conversations,
                                "reset": reset, "block_size": BLOCK, "encoder_cache": encoder_cache,
                                "metrics": metrics, **extra}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "vllm_driver.py"), str(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"engine process failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def tokens(run: dict) -> list:
    return [[turn["tokens"] for turn in conv] for conv in run["turns"]]


def test_greedy_outputs_with_the_connector_equal_vllm_alone_and_later_turns_reuse_the_tiers(assets, tmp_path):
    conversations = [
        [{"text": TEXT}],
        [{"text": "Describe the picture.", "images": [assets["image_a"]]}],
        [{"text": "Compare the two pictures.", "images": [assets["image_a"], assets["image_b"]]}],
        [{"text": "What is in this picture?", "images": [assets["image_b"]]},
         {"text": "Say more about its colours."}, {"text": TEXT}],
    ]
    alone = run_engine(tmp_path, assets["model"], conversations, connector=None)
    tiered = run_engine(tmp_path, assets["model"], conversations, connector=_connector(tmp_path))
    assert tokens(tiered) == tokens(alone)
    # vLLM's own prefix cache is emptied before every turn: without the tier nothing is ever cached ...
    assert all(turn["cached"] == 0 for conv in alone["turns"] for turn in conv)
    # ... with it, each later turn of the chat loads the history its earlier turns stored, a whole block at a time
    chat = tiered["turns"][3]
    for before, turn in zip(chat, chat[1:]):
        assert turn["cached"] >= (before["prompt"] // BLOCK) * BLOCK > 0
        assert turn["cached"] % BLOCK == 0 and turn["cached"] < turn["prompt"]
    # Asynchronous loads (vLLM parks each request while the transfer thread fills its blocks) and synchronous
    # saves: the same answers, the same blocks found.
    (tmp_path / "modes").mkdir()
    other_modes = run_engine(tmp_path, assets["model"], conversations,
                             connector=_connector(tmp_path / "modes", load_mode="async", save_mode="sync"))
    assert tokens(other_modes) == tokens(alone)
    assert [[t["cached"] for t in conv] for conv in other_modes["turns"]] == \
        [[t["cached"] for t in conv] for conv in tiered["turns"]]


def test_a_second_engine_process_finds_the_first_ones_blocks_on_disk_but_never_another_images_or_models(
        assets, tmp_path):
    connector = _connector(tmp_path)
    text = [{"text": TEXT}]
    with_a = [{"text": "Describe the picture.", "images": [assets["image_a"]]}]
    with_b = [{"text": "Describe the picture.", "images": [assets["image_b"]]}]
    first = run_engine(tmp_path, assets["model"], [text, with_a], connector)
    assert [conv[0]["cached"] for conv in first["turns"]] == [0, 0]

    second = run_engine(tmp_path, assets["model"], [text, with_a, with_b], connector, metrics=True)
    assert tokens(second)[:2] == tokens(first)
    text_turn, a_turn, b_turn = (conv[0] for conv in second["turns"])
    assert text_turn["cached"] == (text_turn["prompt"] - 1) // BLOCK * BLOCK > 0
    assert a_turn["cached"] == (a_turn["prompt"] - 1) // BLOCK * BLOCK > 0
    assert b_turn["cached"] == 0  # same text, another image: its blocks hash the pixels
    # vLLM's stat loggers carry the connector's metrics beside its own external-hit counter
    loaded = text_turn["cached"] + a_turn["cached"]
    m = second["metrics"]
    assert m["vllm:external_prefix_cache_hits"] == loaded
    assert m["vllm:qwen3vl_ray_loaded_tokens{tier=disk}"] == loaded
    assert m["vllm:qwen3vl_ray_load_bytes"] == loaded // BLOCK * second["block_nbytes"]
    assert "vllm:qwen3vl_ray_load_seconds" in m  # (vLLM's reader shows counters as ints: well under 1 s here)
    assert m["vllm:qwen3vl_ray_saved_tokens"] > 0  # image B's blocks

    # Another checkpoint with the same tokenizer, the same text, the same disk directory: nothing is shared.
    other = run_engine(tmp_path, assets["other_model"], [text], connector)
    assert other["turns"][0][0]["cached"] == 0


def test_a_corrupt_block_on_disk_is_recomputed_never_served(assets, tmp_path):
    connector = _connector(tmp_path)
    conversation = [[{"text": TEXT}]]
    first = run_engine(tmp_path, assets["model"], conversation, connector)
    files = sorted(p for p in Path(connector["disk_dir"]).rglob("*") if p.is_file() and p.stat().st_size > 4096)
    assert files, "the first engine left no block files on disk"
    for f in files:  # flip bytes in the middle of every payload
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        f.write_bytes(bytes(data))
    second = run_engine(tmp_path, assets["model"], conversation, connector)
    [counters] = second["store"]
    assert counters["hit_blocks"] > 0 and counters["load_failures"] > 0 and not counters["loaded"]
    assert tokens(second) == tokens(first)


@pytest.mark.parametrize("load_mode", ["sync", "async"])
def test_a_block_gone_between_lookup_and_load_is_recomputed_never_served(assets, tmp_path, load_mode):
    """The second engine finds the first one's blocks on disk; their files are deleted after its lookup and
    before its load (the driver's ``remove_disk_files_after_lookup``): every block is reported to vLLM as a
    load error and recomputed, in the engine step (sync) or in the parked request (async), and the answers are
    vLLM's own."""
    connector = _connector(tmp_path, load_mode=load_mode)
    conversation = [[{"text": TEXT}], [{"text": "Describe the picture.", "images": [assets["image_a"]]}]]
    first = run_engine(tmp_path, assets["model"], conversation, connector)
    second = run_engine(tmp_path, assets["model"], conversation, connector, remove_disk_files_after_lookup=True)
    assert tokens(second) == tokens(first)
    [counters] = second["store"]
    assert counters["hit_blocks"] > 0 and not counters["loaded"]
    # every block found was reported and recomputed (vLLM's num_cached_tokens still counts a failed sync hit:
    # it is set when the request is scheduled, before the load runs)
    assert counters["load_failures"] >= counters["hit_blocks"]


def test_preempted_requests_resume_from_the_blocks_they_saved(assets, tmp_path):
    """A paged KV of 16 blocks (15 usable) for four requests that start with 2 blocks each and grow to 8 as they
    generate: vLLM admits all four, then preempts some as they grow, frees their blocks and hands them to the
    others. With the tier, a preempted request's full blocks (prompt and the tokens it had generated) were saved
    as they filled, so it resumes by loading them instead of recomputing them; the answers equal vLLM's own,
    without the tier and without any preemption."""
    prompts = [f"Request {i} of four: " + TEXT[:120] for i in range(4)]
    small = {"num_gpu_blocks": 16, "max_model_len": 448, "max_tokens": 200, "ignore_eos": True, "batch": prompts,
             "reset": False, "metrics": True}
    roomy = run_engine(tmp_path, assets["model"], [], connector=None, **{**small, "num_gpu_blocks": None})
    alone = run_engine(tmp_path, assets["model"], [], connector=None, **small)
    tiered = run_engine(tmp_path, assets["model"], [], connector=_connector(tmp_path), **small)
    assert tiered["metrics"]["vllm:num_preemptions"] > 0
    answers = [r["tokens"] for r in roomy["batch"]]
    assert [r["tokens"] for r in alone["batch"]] == answers
    assert [r["tokens"] for r in tiered["batch"]] == answers
    [counters] = tiered["store"]
    # The four prompts differ from their first block on, so every block loaded is a resumed request's own (vLLM
    # counts a preempted request's hits apart, not in vllm:external_prefix_cache_hits).
    assert counters["loaded"].get("host", 0) > 0


def test_an_images_vision_features_come_from_the_tiers_in_another_process_with_other_text(assets, tmp_path):
    """The encoder-cache connector: the second process asks about the same image with other words (no KV block
    in common), takes the image's encoder output from the disk tier instead of running the vision tower, and
    answers exactly as vLLM alone does."""
    features = _connector(tmp_path)
    first = run_engine(tmp_path, assets["model"], [[{"text": "Describe the picture.", "images": [assets["image_a"]]}]],
                       connector=None, encoder_cache=features)
    [counters] = first["store"]
    assert counters["saved"] == 1 and not counters["loaded"]

    asked_again = [[{"text": "Which colours dominate this image?", "images": [assets["image_a"]]}],
                   [{"text": "Which colours dominate this image?", "images": [assets["image_b"]]}]]
    second = run_engine(tmp_path, assets["model"], asked_again, connector=None, encoder_cache=features)
    alone = run_engine(tmp_path, assets["model"], asked_again, connector=None)
    assert tokens(second) == tokens(alone)
    [counters] = second["store"]
    assert counters["loaded"] == {"disk": 1}  # image A's features; image B was encoded (and saved)
    assert counters["saved"] == 1


def test_a_store_that_cannot_take_a_block_never_fails_the_request(assets, tmp_path):
    """A host tier smaller than one block and no disk tier: every save raises CapacityError inside the engine's
    step. Saving is best effort, so the answers are vLLM's own and nothing is stored."""
    tiny_store = {"host_bytes": "16KiB", "disk_bytes": 0, "block_bytes": "4KiB"}
    conversation = [[{"text": TEXT}], [{"text": "Describe the picture.", "images": [assets["image_a"]]}]]
    broken = run_engine(tmp_path, assets["model"], conversation, connector=tiny_store)
    alone = run_engine(tmp_path, assets["model"], conversation, connector=None)
    assert tokens(broken) == tokens(alone)
    [counters] = broken["store"]
    assert counters["saved"] == 0 and counters["lookups"] > 0
