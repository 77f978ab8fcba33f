"""What the engine's bad-input tests share: a tiny checkpoint and an engine on it (module-scoped pytest
fixtures: import them into the test module by name), a good request, and the check that a bad request
fails alone."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwen3vl_ray.engine.checkpoint import make_checkpoint
from qwen3vl_ray.engine.config import EngineConfig
from qwen3vl_ray.engine.engine import Qwen3VLEngine
from qwen3vl_ray.engine.requests import Request, SamplingParams
from qwen3vl_ray.tiers.config import TierConfig

MiB = 1 << 20
MAX_PIXELS = 256 * 256


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    make_checkpoint("tiny", str(path))
    return str(path)


@pytest.fixture(scope="module")
def engine(ckpt):
    cfg = EngineConfig(chunk_tokens=16, device="cpu", max_pixels=MAX_PIXELS, tiers=[TierConfig("host", 64 * MiB)])
    with Qwen3VLEngine(ckpt, cfg) as eng:
        yield eng


def picture(w=64, h=64, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def chat(*content):
    items = [{"type": "text", "text": c} if isinstance(c, str) else {"type": "image", "image": c} for c in content]
    return [{"role": "user", "content": items}]


def good():
    return Request(chat(picture(), "Hi"), SamplingParams(max_new_tokens=3))


def check_isolated(engine, bad, *needles):
    """The error of ``bad`` run between two good requests; both good ones still complete, with the same tokens."""
    results = engine.generate([good(), bad, good()])
    assert results[0].ok and results[2].ok and len(results[0].token_ids) == 3
    assert results[0].token_ids == results[2].token_ids
    assert not results[1].ok and results[1].token_ids == []
    for needle in needles:
        assert needle in results[1].error, results[1].error
    return results[1].error
