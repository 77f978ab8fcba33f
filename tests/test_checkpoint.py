"""Generated checkpoints load through the real transformers path and behave like Qwen3-VL."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from qwen3vl_ray.engine.checkpoint import MANIFEST, make_checkpoint, model_fingerprint
from qwen3vl_ray.engine.loading import load_model_and_processor, load_processor
from qwen3vl_ray.engine.presets import VOCAB_SIZE, preset_config
from qwen3vl_ray.engine.tokenizer_builder import SPECIAL_TOKEN_IDS, TOKENIZER_SIZE
from qwen3vl_ray.errors import ConfigError
from tests.helpers_threads import run_in_threads


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_model_and_processor(tiny, dtype="float32", device="cpu")


def _image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _chat(img, text="Describe this image."):
    return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]


def test_tiny_loads_through_from_pretrained_and_auto_tokenizer(tiny):
    from transformers import AutoConfig, AutoTokenizer, Qwen3VLForConditionalGeneration

    cfg = AutoConfig.from_pretrained(tiny, local_files_only=True)
    assert cfg.model_type == "qwen3_vl"
    assert (cfg.image_token_id, cfg.video_token_id) == (SPECIAL_TOKEN_IDS["<|image_pad|>"],
                                                        SPECIAL_TOKEN_IDS["<|video_pad|>"])
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (SPECIAL_TOKEN_IDS["<|vision_start|>"],
                                                                    SPECIAL_TOKEN_IDS["<|vision_end|>"])
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny, local_files_only=True, dtype=torch.float32)
    assert model.config.text_config.num_hidden_layers == 2
    tok = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert len(tok) == TOKENIZER_SIZE <= VOCAB_SIZE
    for t, i in SPECIAL_TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(t) == i
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_checkpoint_has_the_files_of_a_real_one(tiny):
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
            "video_preprocessor_config.json", MANIFEST} <= names
    image_cfg = json.loads((tiny / "preprocessor_config.json").read_text())
    assert (image_cfg["patch_size"], image_cfg["temporal_patch_size"], image_cfg["merge_size"]) == (16, 2, 2)
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [SPECIAL_TOKEN_IDS["<|im_end|>"], SPECIAL_TOKEN_IDS["<|endoftext|>"]]
    assert gen["do_sample"] is False
    assert not any(p.name.startswith(".") for p in tiny.parent.iterdir())  # no temp dir left behind


@pytest.mark.parametrize("h,w", [(64, 96), (128, 64)])
def test_processor_expands_image_tokens_between_vision_markers(loaded, h, w):
    _, processor = loaded
    inputs = processor.apply_chat_template(_chat(_image(h, w)), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    n = (h // 32) * (w // 32)
    start = ids.index(SPECIAL_TOKEN_IDS["<|vision_start|>"])
    assert ids[start + 1:start + 1 + n] == [SPECIAL_TOKEN_IDS["<|image_pad|>"]] * n
    assert ids[start + 1 + n] == SPECIAL_TOKEN_IDS["<|vision_end|>"]
    assert ids.count(SPECIAL_TOKEN_IDS["<|image_pad|>"]) == n
    assert inputs["image_grid_thw"].tolist() == [[1, h // 16, w // 16]]
    assert inputs["pixel_values"].shape == (h // 16 * w // 16, 3 * 2 * 16 * 16)
    mm = inputs["mm_token_type_ids"][0].tolist()
    assert mm == [1 if t == SPECIAL_TOKEN_IDS["<|image_pad|>"] else 0 for t in ids]
    # Qwen3-VL prompt format: no default system turn, generation prompt at the end.
    assert ids[:2] == [SPECIAL_TOKEN_IDS["<|im_start|>"], *processor.tokenizer.encode("user")]
    assert processor.tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_text_format(loaded):
    _, processor = loaded
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": _image(32, 32)}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n"
                    "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_generate_with_an_image(loaded):
    model, processor = loaded
    inputs = processor.apply_chat_template(_chat(_image(64, 64)), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    out1 = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    out2 = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert out1.shape[1] > prompt_len
    assert torch.equal(out1, out2)
    # a different image changes the prompt's image features, hence (almost surely) the logits
    other = processor.apply_chat_template(_chat(_image(64, 64, seed=1)), add_generation_prompt=True,
                                          tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        a = model(**inputs).logits[0, -1]
        b = model(**other).logits[0, -1]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("text", [
    "Hello, world! The cat sat on the mat.",
    "café naïve 東京 你好 🙂 привет — ünïcödé ✓ 𝔘",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "1234567890 3.14159 x=y+z; {'a': [1, 2]}",
])
def test_tokenizer_round_trips_text(loaded, text):
    _, processor = loaded
    tok = processor.tokenizer
    ids = tok.encode(text)
    assert all(0 <= i < TOKENIZER_SIZE for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids_and_skippable(loaded):
    tok = loaded[1].tokenizer
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == SPECIAL_TOKEN_IDS["<|im_start|>"] and ids[-1] == SPECIAL_TOKEN_IDS["<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_same_seed_same_weights_other_seed_other_fingerprint(tmp_path, tiny):
    again = make_checkpoint("tiny", tmp_path / "again", seed=0)
    other = make_checkpoint("tiny", tmp_path / "other", seed=1)
    a = (tiny / "model.safetensors").read_bytes()
    assert a == (again / "model.safetensors").read_bytes()
    assert a != (other / "model.safetensors").read_bytes()
    assert (tiny / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    assert model_fingerprint(tiny) == model_fingerprint(again)
    assert model_fingerprint(tiny) != model_fingerprint(other)
    assert model_fingerprint(tiny, full=True) != model_fingerprint(other, full=True)
    assert len(model_fingerprint(tiny)) == 32


def test_make_checkpoint_reuses_a_complete_dir(tiny):
    before = (tiny / "model.safetensors").stat().st_mtime_ns
    assert make_checkpoint("tiny", tiny) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == before


def test_make_checkpoint_refuses_foreign_or_mismatched_dirs(tmp_path, tiny):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="non-empty"):
        make_checkpoint("tiny", junk)
    with pytest.raises(ConfigError, match="seed"):
        make_checkpoint("tiny", tiny, seed=7)
    with pytest.raises(ConfigError, match="allowed"):
        make_checkpoint("huge", tmp_path / "x")
    with pytest.raises(ConfigError, match="seed"):
        make_checkpoint("tiny", tmp_path / "x", seed=-1)


def test_fingerprint_changes_when_a_weight_changes(tmp_path, tiny):
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    fp = model_fingerprint(copy, full=True)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last weight byte
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(copy, full=True) != fp
    assert model_fingerprint(copy) != model_fingerprint(tiny)  # sampled mode reads both ends


def test_load_errors_name_the_problem(tmp_path, tiny):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model_and_processor(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_and_processor(empty)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"'llama'.*qwen3_vl.*qwen3_vl_moe"):
        load_model_and_processor(llama)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(tiny / "config.json", noweights / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model_and_processor(noweights)
    with pytest.raises(ConfigError, match="int8"):
        load_model_and_processor(tiny, dtype="int8")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        model_fingerprint(missing)


def test_load_casts_dtype(tiny):
    model, _ = load_model_and_processor(tiny, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert not model.training


def test_video_input_without_torchvision_is_a_clear_error(tiny, monkeypatch):
    """Without torchvision the processor is the image-and-text one; a video names what is missing. (The setup
    installs torchvision for vLLM, so its absence is simulated: the loader asks ``torchvision_available``.)"""
    import qwen3vl_ray.engine.loading as loading

    monkeypatch.setattr(loading, "torchvision_available", lambda: False)
    processor = load_processor(tiny)
    assert type(processor).__name__ == "ImageTextQwen3VLProcessor"
    with pytest.raises(ValueError, match="torchvision"):
        processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[np.zeros((4, 32, 32, 3))])


def test_tiny_moe_loads_and_generates(tmp_path):
    path = make_checkpoint("tiny-moe", tmp_path / "moe")
    model, processor = load_model_and_processor(path)
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    inputs = processor.apply_chat_template(_chat(_image(32, 64)), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_bench_2b_geometry_matches_qwen3_vl_2b_per_layer():
    cfg = preset_config("bench-2b")
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size) == (
        2048, 16, 8, 128, 6144)
    assert t.rope_parameters["mrope_section"] == [24, 20, 20] and t.rope_parameters["mrope_interleaved"]
    assert (v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size, v.patch_size) == (
        1024, 4096, 16, 2048, 16)
    assert all(0 <= i < v.depth for i in v.deepstack_visual_indexes) and len(v.deepstack_visual_indexes) == 3
    assert t.vocab_size == VOCAB_SIZE and t.num_hidden_layers == 2
    # KV per token per layer equals the real 2B's: 2 * 8 heads * 128 dims * 2 bytes = 4 KiB
    assert 2 * t.num_key_value_heads * t.head_dim * 2 == 4096


@pytest.mark.slow
def test_bench_2b_checkpoint_loads(tmp_path):
    path = make_checkpoint("bench-2b", tmp_path / "b2b")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "BF16"
    model, processor = load_model_and_processor(path, dtype="bfloat16")
    assert model.config.text_config.hidden_size == 2048
    inputs = processor.apply_chat_template(_chat(_image(256, 256)), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert inputs["input_ids"][0].tolist().count(SPECIAL_TOKEN_IDS["<|image_pad|>"]) == 64
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == VOCAB_SIZE


def test_several_images_get_their_own_spans(loaded):
    _, processor = loaded
    msgs = [{"role": "user", "content": [{"type": "image", "image": _image(32, 64)}, {"type": "text", "text": "and"},
                                         {"type": "image", "image": _image(96, 64, seed=2)}]}]
    inputs = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    starts = [i for i, t in enumerate(ids) if t == SPECIAL_TOKEN_IDS["<|vision_start|>"]]
    ends = [i for i, t in enumerate(ids) if t == SPECIAL_TOKEN_IDS["<|vision_end|>"]]
    # 32x64 -> 1x2 merged tokens, 96x64 -> 3x2; spans in prompt order
    assert [e - s - 1 for s, e in zip(starts, ends)] == [2, 6]
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 4], [1, 6, 4]]
    assert inputs["pixel_values"].shape[0] == 2 * 4 + 6 * 4


def test_concurrent_writers_agree(tmp_path, tiny):
    target = tmp_path / "shared"
    results = []
    errors = run_in_threads(lambda: results.append(make_checkpoint("tiny", target)), 2)
    assert errors == [] and results == [target, target]
    assert (target / MANIFEST).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # both temp dirs cleaned up
    assert (target / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()


def test_a_full_fingerprint_is_remembered_per_checkpoint_version(tmp_path, tiny, monkeypatch):
    from qwen3vl_ray.engine import checkpoint as C

    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    memo = tmp_path / "memo"
    fp = model_fingerprint(copy, full=True, memo_dir=memo)
    [file] = list(memo.iterdir())
    assert (memo.stat().st_mode & 0o777) == 0o700 and all(c in "0123456789abcdef" for c in file.stem)
    assert json.loads(file.read_text())["fingerprint"] == fp
    # another process (empty in-process memo) reads it back instead of hashing every byte again
    monkeypatch.setattr(C, "_fingerprint_memo", {})
    monkeypatch.setattr(C, "_hash_checkpoint", lambda *a: pytest.fail("hashed again"))
    assert model_fingerprint(copy, full=True, memo_dir=memo) == fp
    monkeypatch.undo()
    # a new version of the weights (size or mtime changed) is hashed again; a garbled memo is ignored
    with open(copy / "model.safetensors", "ab") as f:
        f.write(b"\0")
    assert model_fingerprint(copy, full=True, memo_dir=memo) != fp
    for garbled in ('{"stats": "x", "fingerprint": "../../etc"}', "[]", "not json"):
        file.write_text(garbled)
        monkeypatch.setattr(C, "_fingerprint_memo", {})
        assert model_fingerprint(copy, full=True, memo_dir=memo) == model_fingerprint(copy, full=True, memo_dir=None)


def test_the_engine_identifies_the_model_by_every_weight_byte_by_default(tiny):
    from qwen3vl_ray.engine.config import EngineConfig
    from qwen3vl_ray.engine.request_keys import RequestKeyer

    assert EngineConfig().fingerprint == "full"
    keyer = RequestKeyer(tiny, EngineConfig(device="cpu"))
    assert keyer.fingerprint == model_fingerprint(tiny, full=True) != model_fingerprint(tiny)
    assert RequestKeyer(tiny, EngineConfig(device="cpu", fingerprint="sampled")).fingerprint == model_fingerprint(tiny)
    with pytest.raises(ConfigError, match="fingerprint must be 'full' or 'sampled'"):
        EngineConfig(fingerprint="md5")
