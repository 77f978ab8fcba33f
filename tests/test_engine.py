"""Engine correctness on the tiny preset (fp32, CPU): with the store on, greedy tokens equal plain
``model.generate`` without it, while the metrics show what was reused."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from qwen3vl_ray.codecs.base import available_codecs, make_codec
from qwen3vl_ray.engine.checkpoint import make_checkpoint
from qwen3vl_ray.engine.config import EngineConfig
from qwen3vl_ray.engine.engine import Qwen3VLEngine
from qwen3vl_ray.engine.loading import load_processor
from qwen3vl_ray.engine.prompt import build_prompt
from qwen3vl_ray.engine.reference import reference_generate
from qwen3vl_ray.engine.requests import Request, SamplingParams
from qwen3vl_ray.tiers.config import TierConfig

MiB = 1 << 20
N_NEW = 8
CHUNK = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    make_checkpoint("tiny", str(path))
    return str(path)


def tiers(*kinds, disk_path=None, codec="none", cap=64 * MiB):
    out = []
    for k in kinds:
        out.append(TierConfig(k, cap, codec=codec, path=disk_path if k == "disk" else None, block_bytes=64 << 10))
    return out


@pytest.fixture(scope="module")
def engine(ckpt):
    eng = Qwen3VLEngine(ckpt, EngineConfig(chunk_tokens=CHUNK, device="cpu", tiers=tiers("device", "host")))
    yield eng
    eng.close()


def picture(seed, w=96, h=64):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def chat(*content, text="Describe the picture in a few words."):
    items = [{"type": "image", "image": c} if not isinstance(c, str) else {"type": "text", "text": c} for c in content]
    return [{"role": "user", "content": items + [{"type": "text", "text": text}]}]


def run(eng, messages, session=None, n=N_NEW, **kw):
    res = eng.generate([Request(messages, SamplingParams(max_new_tokens=n), session_id=session, **kw)])[0]
    assert res.error is None, res.error
    return res


def ref(eng, messages, n=N_NEW):
    return reference_generate(eng.model, eng.processor, messages, n)


PREAMBLE = "You are a careful assistant. Answer briefly and precisely about the image. "


def test_cold_then_full_hit_match_generate(engine):
    msgs = chat(PREAMBLE, picture(1), text="What colour dominates? (cold/full-hit test)")
    want = ref(engine, msgs)
    cold = run(engine, msgs)
    assert cold.token_ids == want
    assert cold.metrics.cached_tokens == 0 and cold.metrics.images_encoded == 1
    n = cold.metrics.prompt_tokens
    assert cold.metrics.stored_chunks == n // CHUNK + (n % CHUNK > 0)  # full chunks + the partial tail
    # same request again: all but the last token comes from the store, the image is not encoded
    hit = run(engine, msgs)
    assert hit.token_ids == want
    assert hit.metrics.cached_tokens == n - 1
    assert hit.metrics.images_encoded == 0 and hit.metrics.stored_chunks == 0


def test_shared_prefix_different_question(engine):
    img = picture(2)
    first = chat(PREAMBLE, img, text="Question one: what is in the top left corner?")
    second = chat(PREAMBLE, img, text="Question two: is there any text visible?")
    run(engine, first)
    res = run(engine, second)
    assert res.token_ids == ref(engine, second)
    assert res.metrics.cached_tokens > 0
    # the image sits inside the reused prefix or its features come from the vision cache
    assert res.metrics.images_encoded == 0


def test_two_images_same_text_do_not_share_kv(engine):
    a, b = chat(PREAMBLE, picture(3)), chat(PREAMBLE, picture(4))
    ra = run(engine, a)
    rb = run(engine, b)
    assert ra.token_ids == ref(engine, a) and rb.token_ids == ref(engine, b)
    # only the text before the image can be shared: the image's chunks have another key
    image_start = build_prompt(engine.processor, b, 1 << 30, engine.image_token_id).images[0].start
    assert 0 < rb.metrics.cached_tokens <= image_start
    assert rb.metrics.images_encoded == 1 and rb.metrics.vision_cache_hits == 0


def test_same_image_other_resolution_is_another_key(engine):
    img = picture(5, 128, 96)
    small = chat(PREAMBLE, img)
    big = [{"role": "user", "content": [{"type": "text", "text": PREAMBLE},
                                        {"type": "image", "image": img, "resized_height": 160, "resized_width": 192},
                                        {"type": "text", "text": "Describe the picture in a few words."}]}]
    run(engine, small)
    res = run(engine, big)
    assert res.token_ids == ref(engine, big)
    assert res.metrics.vision_cache_hits == 0 and res.metrics.images_encoded == 1


def test_several_images_in_one_prompt(engine):
    p1, p2, p3 = picture(6), picture(7, 64, 64), picture(8, 128, 64)
    msgs = chat("First:", p1, "Second:", p2, "Third:", p3, text="Which one is brightest?")
    want = ref(engine, msgs)
    assert run(engine, msgs).token_ids == want
    hit = run(engine, msgs)
    assert hit.token_ids == want and hit.metrics.images_encoded == 0
    # swap the middle image: its features and everything after it are new, the first image is reused
    swapped = chat("First:", p1, "Second:", picture(9, 64, 64), "Third:", p3, text="Which one is brightest?")
    res = run(engine, swapped)
    assert res.token_ids == ref(engine, swapped)
    assert res.metrics.images_encoded == 1 and res.metrics.vision_cache_hits >= 1


def test_cut_inside_an_image_span(ckpt):
    img = picture(10, 128, 128)
    msgs = chat("Look:", img, text="Now answer question A about it.")
    other = chat("Look:", img, text="And question B, different words.")
    span = build_prompt(load_processor(ckpt), other, 1 << 30, _image_token_id(ckpt)).images[0]
    # a chunk size whose first boundary falls in the middle of the image's token span
    chunk = span.start + (span.end - span.start) // 2
    cfg = EngineConfig(chunk_tokens=chunk, device="cpu", tiers=tiers("host"), vision_cache=False)
    with Qwen3VLEngine(ckpt, cfg) as eng:
        run(eng, msgs)
        res = run(eng, other)
        assert res.token_ids == ref(eng, other)
        assert res.metrics.cached_tokens == chunk and span.start < chunk < span.end
        assert res.metrics.images_encoded == 1  # the suffix needs the rest of the image's features


def _image_token_id(ckpt):
    import json
    from pathlib import Path

    return json.loads((Path(ckpt) / "config.json").read_text())["image_token_id"]


def test_three_turn_chat_keeps_kv(engine):
    img = picture(11)
    msgs = chat(PREAMBLE, img, text="Turn one: describe it.")
    prev_ctx = 0
    for turn in range(3):
        want = ref(engine, msgs)
        res = run(engine, msgs, session="chat-1")
        assert res.token_ids == want, f"turn {turn}"
        if turn:
            # the previous turn's whole prompt came back from the store, partial last chunk included
            # (its answer too, as far as the answer re-tokenizes to the same ids)
            assert res.metrics.cached_tokens >= prev_ctx
        prev_ctx = res.metrics.prompt_tokens
        msgs = msgs + [{"role": "assistant", "content": res.text},
                       {"role": "user", "content": [{"type": "text", "text": f"Turn {turn + 2}: tell me more."}]}]
    assert engine.session_resumable("chat-1")
    # token level: a next prompt that starts with everything the session holds reuses all of it
    held = engine.sessions.get("chat-1")
    loaded = engine.sessions.resume("chat-1", held.token_ids + [5, 6, 7], held.spans, len(held.token_ids) + 2)
    assert loaded.n_tokens == len(held.token_ids)


def test_served_from_host_tier(ckpt):
    cfg = EngineConfig(chunk_tokens=CHUNK, device="cpu", tiers=tiers("device", "host"))
    with Qwen3VLEngine(ckpt, cfg) as eng:
        msgs = chat(PREAMBLE, picture(12))
        run(eng, msgs)
        # swap everything this engine stored down to the host tier (what device pressure does)
        for key in list(eng.store.keys()):
            assert eng.store.where(key) == "device" and eng.store.demote(key)
            assert eng.store.where(key) == "host"
        res = run(eng, msgs)
        assert res.token_ids == ref(eng, msgs)
        assert res.metrics.cached_tiers == {"host": res.metrics.prompt_tokens - 1}


def test_served_from_disk_after_restart(ckpt, tmp_path):
    cfg = EngineConfig(chunk_tokens=CHUNK, device="cpu", tiers=tiers("disk", disk_path=str(tmp_path / "kv")))
    msgs = chat(PREAMBLE, picture(13))
    with Qwen3VLEngine(ckpt, cfg) as first:
        want = ref(first, msgs)
        assert run(first, msgs).token_ids == want
    # a new engine (a restart) on the same directory finds the entries on disk
    with Qwen3VLEngine(ckpt, cfg) as second:
        res = run(second, msgs)
        assert res.token_ids == want
        assert res.metrics.cached_tiers.get("disk", 0) == res.metrics.cached_tokens > 0
        assert res.metrics.images_encoded == 0


LOSSLESS = [c for c in available_codecs() if make_codec(c).lossless]


@pytest.mark.parametrize("codec", LOSSLESS)
def test_lossless_codecs_are_token_identical(ckpt, codec):
    cfg = EngineConfig(chunk_tokens=CHUNK, device="cpu", tiers=tiers("host", codec=codec))
    with Qwen3VLEngine(ckpt, cfg) as eng:
        msgs = chat(PREAMBLE, picture(14))
        want = ref(eng, msgs)
        run(eng, msgs)
        res = run(eng, msgs)
        assert res.token_ids == want and res.metrics.cached_tokens > 0


def test_seeded_sampling_reproducible_with_and_without_cache(engine):
    msgs = chat(PREAMBLE, picture(15), text="Tell a tiny story.")
    sp = SamplingParams(max_new_tokens=N_NEW, temperature=0.8, top_p=0.9, seed=1234)
    a = engine.generate([Request(msgs, sp)])[0]
    b = engine.generate([Request(msgs, sp)])[0]
    assert a.error is None and b.metrics.cached_tokens > 0
    assert a.token_ids == b.token_ids


def test_image_given_as_path_bytes_or_pil_hits_same_entry(engine, tmp_path):
    img = picture(16)
    path = tmp_path / "p.png"
    img.save(path)
    run(engine, chat(PREAMBLE, path))  # a Path (a str would be a text item in this helper)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    res = run(engine, chat(PREAMBLE, buf.getvalue()))
    assert res.metrics.images_encoded == 0 and res.metrics.cached_tokens > 0


def test_store_off_matches_too(ckpt):
    cfg = EngineConfig(chunk_tokens=CHUNK, device="cpu", tiers=tiers("host"), prefix_cache=False, vision_cache=False)
    with Qwen3VLEngine(ckpt, cfg) as eng:
        msgs = chat(PREAMBLE, picture(17))
        a, b = run(eng, msgs), run(eng, msgs)
        assert a.token_ids == b.token_ids == ref(eng, msgs)
        assert b.metrics.cached_tokens == 0 and b.metrics.images_encoded == 1


def test_stored_chunk_layout_and_image_keys(engine):
    msgs = chat(PREAMBLE, picture(18), text="Layout check.")
    res = run(engine, msgs)
    prompt = build_prompt(engine.processor, msgs, 1 << 30, engine.image_token_id)
    keys = engine.prefix.keys(prompt.input_ids, [im.span for im in prompt.images])
    chunk = engine.store.get(keys[0], promote=False)
    g = engine.geometry
    # one chunk = one tensor [layers, 2 (k, v), kv_heads, chunk_tokens, head_dim] in the model dtype
    assert tuple(chunk.shape) == (g.layers, 2, g.kv_heads, CHUNK, g.head_dim) and chunk.dtype == torch.float32
    assert res.ok and all(engine.store.contains(k) for k in keys)
    # another image with the same size and text changes every key from the image's chunk on, never before
    other = build_prompt(engine.processor, chat(PREAMBLE, picture(19), text="Layout check."), 1 << 30, engine.image_token_id)
    other_keys = engine.prefix.keys(other.input_ids, [im.span for im in other.images])
    first_image_chunk = prompt.images[0].start // CHUNK
    assert other.input_ids.tolist() == prompt.input_ids.tolist()  # identical token ids...
    assert other_keys[:first_image_chunk] == keys[:first_image_chunk]
    assert all(a != b for a, b in zip(other_keys[first_image_chunk:], keys[first_image_chunk:]))  # ...other keys


def test_positions_shortcut_matches_get_rope_index(engine):
    # several images of different shapes, then text: the grid-based offset equals the per-token pass
    msgs = chat("a", picture(20, 64, 128), "b", picture(21, 128, 64), "c", picture(22, 96, 96), text="tail text")
    prompt = build_prompt(engine.processor, msgs, 1 << 30, engine.image_token_id)
    n = len(prompt)
    pos3, delta = engine.model.model.get_rope_index(prompt.input_ids[None], mm_token_type_ids=prompt.mm_token_type_ids[None],
                                                    image_grid_thw=prompt.image_grid_thw)
    for cut in (prompt.images[-1].end, n - 1):
        fast, fast_delta = engine._positions(prompt, cut)
        assert fast_delta == int(delta)
        assert torch.equal(fast[1:], pos3[:, :, cut:]) and torch.equal(fast[0, 0], torch.arange(cut, n))
    slow, _ = engine._positions(prompt, prompt.images[0].start)  # before an image: the full pass
    assert torch.equal(slow[1:], pos3[:, :, prompt.images[0].start:])


def test_pool_blocks_fit_the_kv_chunk_so_a_tier_holds_what_it_was_sized_for(ckpt):
    from qwen3vl_ray.engine.prefix_kv import chunk_fitted_tiers

    # 8B geometry at 16 tokens: 16 x 147,456 B = 2.25 MiB = 9 x 256 KiB -> 256 KiB blocks, no waste
    fitted = chunk_fitted_tiers([TierConfig("device", 64 * MiB), TierConfig("host", 64 * MiB, codec="int8"),
                                 TierConfig("disk", 64 * MiB, path="/x")], 16 * 147_456)
    assert [t.block_bytes for t in fitted] == [256 << 10, 32 << 10, 1 * MiB]  # codec: 8x finer; disk unpooled
    assert chunk_fitted_tiers([TierConfig("device", MiB, block_bytes=8192)], 1 << 20)[0].block_bytes == 8192  # never raised
    # the tiny model's 16-token chunk is 16 KiB: a default (1 MiB-block) device tier must still hold ~64 per MiB
    eng = Qwen3VLEngine(ckpt, EngineConfig(chunk_tokens=CHUNK, device="cpu", tiers=[TierConfig("device", 16 * MiB)]))
    [r] = eng.generate([Request([{"role": "user", "content": "word " * 200}], SamplingParams(max_new_tokens=2))])
    assert r.error is None
    chunk_bytes = eng.geometry.bytes_per_token * CHUNK
    kv_chunks = r.metrics.prompt_tokens // CHUNK
    used = eng.store.stats()["tiers"][0]["used_bytes"]
    assert kv_chunks * chunk_bytes <= used <= (kv_chunks + 2) * chunk_bytes  # + the session's partial tail
