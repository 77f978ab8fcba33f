"""Lossy KV codecs in the store: greedy tokens mostly agree with plain generate and logits stay close."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwen3vl_ray.engine.checkpoint import make_checkpoint
from qwen3vl_ray.engine.config import EngineConfig
from qwen3vl_ray.engine.engine import Qwen3VLEngine
from qwen3vl_ray.engine.reference import reference_generate
from qwen3vl_ray.engine.requests import Request, SamplingParams
from qwen3vl_ray.tiers.config import TierConfig

N_PROMPTS, N_NEW = 20, 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-lossy") / "ckpt"
    make_checkpoint("tiny", str(path))
    return str(path)


def prompt(i):
    img = Image.fromarray((np.random.RandomState(100 + i).rand(64, 64 + 32 * (i % 3), 3) * 255).astype("uint8"))
    return [{"role": "user", "content": [{"type": "text", "text": f"Prompt number {i}: a shared style of preamble. "},
                                         {"type": "image", "image": img},
                                         {"type": "text", "text": f"Question {i}: what do you see?"}]}]


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["int8", "kv-int8"])
def test_int8_codecs_token_agreement_and_logits_cosine(ckpt, codec):
    cfg = EngineConfig(chunk_tokens=16, device="cpu", tiers=[TierConfig("host", 256 << 20, codec=codec)])
    agree = total = 0
    cosines = []
    with Qwen3VLEngine(ckpt, cfg) as eng:
        for i in range(N_PROMPTS):
            msgs = prompt(i)
            want, want_logits = reference_generate(eng.model, eng.processor, msgs, N_NEW, return_logits=True)
            sp = SamplingParams(max_new_tokens=N_NEW)
            assert eng.generate([Request(msgs, sp)])[0].ok  # cold: stores int8 KV + features
            hit = eng.generate([Request(msgs, sp, return_logits=True)])[0]
            assert hit.ok and hit.metrics.cached_tokens > 0  # served from the lossy entries
            for step, (a, b) in enumerate(zip(hit.token_ids, want)):
                agree += a == b
                total += 1
                cosines.append(torch.nn.functional.cosine_similarity(hit.logits[step], want_logits[step].float(), dim=0).item())
                if a != b:
                    break  # later steps continue from different tokens: not comparable
            total += len(want) - step - 1  # positions after a divergence count as disagreements
    print(f"{codec}: token agreement {agree}/{total} = {agree / total:.3f}, worst logits cosine {min(cosines):.5f}")
    assert agree / total >= 0.95, f"{codec}: token agreement {agree}/{total}"
    assert min(cosines) >= 0.99, f"{codec}: worst logits cosine {min(cosines):.4f}"
