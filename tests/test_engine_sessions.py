"""Sessions under device pressure: an idle chat's KV is swapped down the tiers and comes back without
recompute on its next turn."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwen3vl_ray.engine.checkpoint import make_checkpoint
from qwen3vl_ray.engine.config import EngineConfig
from qwen3vl_ray.engine.engine import Qwen3VLEngine
from qwen3vl_ray.engine.loading import load_processor
from qwen3vl_ray.engine.prompt import build_prompt
from qwen3vl_ray.engine.reference import reference_generate
from qwen3vl_ray.engine.requests import Request, SamplingParams
from qwen3vl_ray.tiers.config import TierConfig

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sess") / "ckpt"
    make_checkpoint("tiny", str(path))
    return str(path)


def chat(seed, text):
    img = Image.fromarray((np.random.RandomState(seed).rand(64, 96, 3) * 255).astype("uint8"))
    return [{"role": "user", "content": [{"type": "text", "text": "Session preamble, fairly long text. " * 2},
                                         {"type": "image", "image": img}, {"type": "text", "text": text}]}]


def test_idle_session_swapped_down_and_resumed_without_recompute(ckpt):
    # The budget is 1.5x one turn's live KV: after A's turn its entries fill most of the device tier,
    # so B's turn only fits once idle A is demoted to host.
    sp = SamplingParams(max_new_tokens=6)
    a1 = chat(1, "Session A, turn one.")
    n = len(build_prompt(load_processor(ckpt), a1, 1 << 30, _image_token_id(ckpt)))
    need = (n + sp.max_new_tokens) * KiB  # tiny: 2 layers x 2 (k, v) x 2 heads x 32 dims x 4 bytes = 1 KiB/token
    budget = need * 3 // 2
    cfg = EngineConfig(chunk_tokens=16, device="cpu", kv_device_budget_bytes=budget, session_idle_s=0.0,
                       tiers=[TierConfig("device", budget, block_bytes=4 * KiB),
                              TierConfig("host", 64 * MiB, block_bytes=4 * KiB)])
    with Qwen3VLEngine(ckpt, cfg) as eng:
        assert eng.geometry.bytes_per_token == KiB
        ra = eng.generate([Request(a1, sp, session_id="A")])[0]
        assert ra.ok, ra.error
        a_keys = eng.sessions.get("A").keys
        assert any(eng.store.where(k) == "device" for k in a_keys)

        rb = eng.generate([Request(chat(2, "Session B, turn one."), sp, session_id="B")])[0]
        assert rb.ok, rb.error
        # A was idle: its own entries left the device to make room for B, and none was dropped (the
        # preamble chunks A shares with B came back up when B loaded them)
        assert eng.budget.demoted > 0
        a_only = set(a_keys) - set(eng.sessions.get("B").keys)
        assert a_only and all(eng.store.where(k) in ("host", "disk") for k in a_only)
        assert eng.session_resumable("A")

        # A's next turn: its previous prompt comes back from host; tokens equal plain generate
        a2 = a1 + [{"role": "assistant", "content": ra.text},
                   {"role": "user", "content": [{"type": "text", "text": "Session A, turn two."}]}]
        r2 = eng.generate([Request(a2, sp, session_id="A")])[0]
        assert r2.ok, r2.error
        assert r2.token_ids == reference_generate(eng.model, eng.processor, a2, sp.max_new_tokens)
        assert r2.metrics.cached_tokens >= ra.metrics.prompt_tokens
        assert r2.metrics.cached_tiers.get("host", 0) > 0
        assert r2.metrics.images_encoded == 0


def _image_token_id(ckpt):
    import json
    from pathlib import Path

    return json.loads((Path(ckpt) / "config.json").read_text())["image_token_id"]


def test_close_session_drops_its_tail(ckpt):
    cfg = EngineConfig(chunk_tokens=16, device="cpu", tiers=[TierConfig("host", 64 * MiB)])
    with Qwen3VLEngine(ckpt, cfg) as eng:
        r = eng.generate([Request(chat(3, "hello"), SamplingParams(max_new_tokens=3), session_id="S")])[0]
        assert r.ok
        tail = eng.sessions.get("S").tail_key
        assert tail is not None and eng.store.contains(tail)
        eng.close_session("S")
        assert not eng.store.contains(tail) and eng.sessions.get("S") is None


def test_a_running_turn_never_counts_its_own_session_as_idle(ckpt):
    # Every session is idle once its turn ends (session_idle_s=0). A's second turn needs room: the idle
    # session B's entries make it, not A's own tail, which the turn is about to load (a demotion of it would
    # only send it down and bring it straight back up).
    sp = SamplingParams(max_new_tokens=6)
    a1, b1 = chat(1, "Session A, turn one."), chat(2, "Session B, turn one, a little longer than A's.")
    cfg = EngineConfig(chunk_tokens=16, device="cpu", kv_device_budget_bytes=64 * MiB, session_idle_s=0.0,
                       tiers=[TierConfig("device", 8 * MiB, block_bytes=KiB), TierConfig("host", 64 * MiB, block_bytes=KiB)])
    with Qwen3VLEngine(ckpt, cfg) as eng:
        ra = eng.generate([Request(a1, sp, session_id="A")])[0]
        rb = eng.generate([Request(b1, sp, session_id="B")])[0]
        assert ra.ok and rb.ok, (ra.error, rb.error)
        a_tail, b_tail = eng.sessions.get("A").tail_key, eng.sessions.get("B").tail_key
        assert a_tail is not None and eng.store.where(a_tail) == "device" == eng.store.where(b_tail)
        assert eng.sessions.idle_order() == ["A", "B"]  # A is the most idle: it goes first
        a2 = a1 + [{"role": "assistant", "content": ra.text},
                   {"role": "user", "content": [{"type": "text", "text": "Session A, turn two."}]}]
        n2 = len(build_prompt(eng.processor, a2, cfg.max_pixels, _image_token_id(ckpt)))
        # just short of room for A's second turn: one demotion of an idle entry makes it fit
        eng.budget.budget_bytes = eng.budget.used_bytes() + (n2 + sp.max_new_tokens) * KiB - 1
        r2 = eng.generate([Request(a2, sp, session_id="A")])[0]
        assert r2.ok, r2.error
        assert eng.budget.demoted > 0 and eng.store.where(b_tail) == "host"
        assert set(r2.metrics.cached_tiers) == {"device"}  # A's tail was loaded from the device, not from host
        assert r2.token_ids == reference_generate(eng.model, eng.processor, a2, sp.max_new_tokens)
