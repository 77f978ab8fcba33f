"""Bad input gets a clear error naming the problem, and the other requests of the same call complete."""

from __future__ import annotations

import pytest
from PIL import Image

from qwen3vl_ray.engine.config import EngineConfig
from qwen3vl_ray.engine.engine import Qwen3VLEngine
from qwen3vl_ray.engine.requests import Request, RequestError, SamplingParams
from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.tiers.config import TierConfig
from tests.helpers_engine import MiB, chat, check_isolated, ckpt, engine, good  # noqa: F401 (ckpt, engine: fixtures)


def with_image(image):
    return Request(chat(image, "Hi"), SamplingParams(max_new_tokens=3))


def test_missing_image_file(engine, tmp_path):
    check_isolated(engine, with_image(tmp_path / "nope.png"), "ImageError", "nope.png", "no such file")


def test_corrupt_image_file(engine, tmp_path):
    path = tmp_path / "broken.png"
    good_png = tmp_path / "ok.png"
    Image.new("RGB", (32, 32)).save(good_png)
    path.write_bytes(good_png.read_bytes()[:40])  # truncated PNG
    check_isolated(engine, with_image(path), "ImageError", "broken.png", "not a readable image")


def test_garbage_bytes(engine):
    check_isolated(engine, with_image(b"definitely not an image"), "ImageError", "not a readable image")


def test_too_many_pixels(engine):
    big = Image.new("RGB", (512, 512))
    check_isolated(engine, with_image(big), "512x512", "262144", "max_pixels 65536")


def test_empty_messages(engine):
    check_isolated(engine, Request([]), "RequestError", "messages must be a non-empty list")


def test_unknown_role_and_content_type(engine):
    check_isolated(engine, Request([{"role": "robot", "content": "hi"}]), "role 'robot'")
    check_isolated(engine, Request([{"role": "user", "content": [{"type": "audio"}]}]), "type 'audio'")


def test_not_a_request(engine):
    check_isolated(engine, 42, "RequestError", "int")


def test_request_that_can_never_fit_the_device_budget(ckpt):
    # 64 KiB of device KV (1 KiB/token on tiny) cannot hold a ~130-token prompt: a clear CapacityError,
    # not an out-of-memory crash; a short request in the same call still runs
    cfg = EngineConfig(chunk_tokens=16, device="cpu", kv_device_budget_bytes=64 << 10,
                       tiers=[TierConfig("device", 32 << 10, block_bytes=4 << 10), TierConfig("host", 64 * MiB)])
    with Qwen3VLEngine(ckpt, cfg) as eng:
        short = Request([{"role": "user", "content": "x"}], SamplingParams(max_new_tokens=1))
        long = Request([{"role": "user", "content": "y" * 120}], SamplingParams(max_new_tokens=4))
        results = eng.generate([long, short])
        assert "CapacityError" in results[0].error and "kv_device_budget_bytes" in results[0].error
        assert results[1].ok


def test_unknown_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Qwen3VLEngine(str(tmp_path / "no-such-model"), EngineConfig(device="cpu"))


def test_checkpoint_of_another_architecture(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        Qwen3VLEngine(str(tmp_path / "llama"), EngineConfig(device="cpu"))


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Qwen3VLEngine(str(tmp_path / "empty"), EngineConfig(device="cpu"))


@pytest.mark.parametrize("kwargs, needle", [
    ({"chunk_tokens": 0}, "chunk_tokens"),
    ({"dtype": "int3"}, "dtype"),
    ({"device": "tpu"}, "device"),
    ({"max_pixels": -1}, "max_pixels"),
    ({"tiers": []}, "at least one"),
    ({"policy": "fifo-ish"}, "unknown eviction policy"),
    ({"tiers": [TierConfig("host", MiB), TierConfig("device", MiB)]}, "ordered"),
    ({"kv_device_budget_bytes": MiB, "tiers": [TierConfig("device", 2 * MiB)]}, "exceeds kv_device_budget_bytes"),
])
def test_engine_config_validation(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("kwargs, needle", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
])
def test_sampling_params_validation(kwargs, needle):
    with pytest.raises(RequestError, match=needle):
        SamplingParams(**kwargs)


def test_requests_given_as_json_dicts_take_sampling_as_a_dict_and_name_unknown_fields(engine):
    msgs = good().messages
    ok, unknown, typed = engine.generate([
        {"messages": msgs, "sampling": {"max_new_tokens": 3}, "id": 7},
        {"messages": msgs, "sampling": {"max_tokens": 3}},
        Request(msgs, SamplingParams(max_new_tokens=3)),
    ])
    assert ok.error is None and len(ok.token_ids) == 3 and ok.request_id == "7"
    assert list(ok.token_ids) == list(typed.token_ids)
    assert "unknown sampling parameter(s) 'max_tokens'" in unknown.error and "max_new_tokens" in unknown.error
    with pytest.raises(RequestError, match="sampling must be a SamplingParams"):
        Request(msgs, sampling=3)
