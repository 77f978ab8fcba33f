"""Property tests: every codec keeps shape/dtype/device; lossless is bit-exact; lossy stays in its bound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings

from qwen3vl_ray.codecs import auto, available_codecs, decode, make_codec, relative_error, transcode, unpack_payload
from qwen3vl_ray.errors import CodecError
from tests.test_codecs_inputs import DTYPES, float_tensors, kv_tensors, make_tensor

FAST = settings(max_examples=40, deadline=None)
LOSSLESS = ["none", "zstd", "sparse", "zstd:level=1"]
LOSSY = ["int8", "int4", "fp8", "int8:group=7,axis=0", "int4:group=3", "fp8:group=1", "int8+zstd", "fp16", "bf16",
         "lowrank", "lowrank:max_error=0.3"]
KV = ["kv-int8", "kv-int4", "kv-int8:group=8,residual=5", "kv-int4:group=16,residual=100", "kv-int4+zstd"]


def bits(t: torch.Tensor) -> torch.Tensor:
    # a fresh dense copy: .contiguous() keeps odd strides on size-1 dims, which .view(uint8) rejects
    t = torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def assert_same_frame(x: torch.Tensor, y: torch.Tensor) -> None:
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.is_contiguous()


def assert_within_bound(codec, x: torch.Tensor, y: torch.Tensor) -> None:
    bound = codec.error_bound(x)
    err = relative_error(x, y)
    assert err <= bound, f"{codec.spec()}: error {err} over its bound {bound} on {x.dtype} {tuple(x.shape)}"


def test_registry_lists_every_codec():
    assert set(available_codecs()) >= {"none", "zstd", "fp16", "bf16", "int8", "int4", "fp8", "kv-int8", "kv-int4",
                                        "lowrank", "sparse", "auto"}


@pytest.mark.parametrize("spec", LOSSLESS)
@FAST
@given(x=float_tensors())
def test_lossless_is_bit_exact(spec, x):
    codec = make_codec(spec)
    assert codec.lossless
    y = decode(codec.encode(x), x.device)
    assert_same_frame(x, y)
    assert torch.equal(bits(x), bits(y))


@pytest.mark.parametrize("spec", LOSSLESS)
def test_lossless_keeps_nan_inf_and_negative_zero(spec):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.5], dtype=torch.bfloat16)
    assert torch.equal(bits(x), bits(decode(make_codec(spec).encode(x))))


@pytest.mark.parametrize("spec", LOSSY)
@FAST
@given(x=float_tensors())
def test_lossy_round_trip_within_bound(spec, x):
    codec = make_codec(spec)
    try:
        payload = codec.encode(x)
    except CodecError as exc:
        # the only refusal allowed on finite input: a cast that would overflow
        assert spec == "fp16" and "overflows" in str(exc) and float(x.abs().max()) > 65504
        return
    y = decode(payload, x.device)
    assert_same_frame(x, y)
    assert_within_bound(codec, x, y)


@pytest.mark.parametrize("spec", KV)
@FAST
@given(x=kv_tensors())
def test_kv_round_trip_within_bound(spec, x):
    codec = make_codec(spec)
    y = decode(codec.encode(x), x.device)
    assert_same_frame(x, y)
    assert_within_bound(codec, x, y)


@pytest.mark.parametrize("budget", [0.0, 0.01, 0.1, 0.3])
@settings(max_examples=25, deadline=None)
@given(x=float_tensors() | kv_tensors())
def test_auto_never_exceeds_budget(budget, x):
    codec = make_codec(f"auto:max_error={budget}")
    chosen, payload = codec.choose(x)
    assert unpack_payload(payload)[0] == chosen.name  # the payload records the choice
    y = decode(payload, x.device)
    assert_same_frame(x, y)
    assert relative_error(x, y) <= budget


def test_auto_picks_small_codecs_when_they_fit():
    # a rank-4 matrix -> lowrank at a 1% budget; a KV chunk with outlier key channels -> a KV quantizer
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(256, 4, generator=gen) @ torch.randn(4, 192, generator=gen)
    assert make_codec("auto").choose(low)[0].name == "lowrank"
    kv = make_tensor((1, 2, 2, 64, 64), torch.bfloat16, "normal", 1)
    kv[:, 0, :, :, 3] *= 30
    assert make_codec("auto:max_error=0.15").choose(kv)[0].name == "kv-int4"
    # mostly zeros -> sparse, bit-exact
    sp = torch.zeros(64, 64)
    sp[1, 2] = 3.0
    chosen, payload = make_codec("auto").choose(sp)
    assert chosen.name == "sparse" and torch.equal(decode(payload), sp)


def test_auto_takes_the_most_accurate_of_equal_size_candidates():
    # vision-like features: per-channel scales and a few hot channels. int8 per token and per channel (axis=0)
    # store the same bytes; per channel errs several times less, whichever order the candidates are listed in
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1024, generator=gen) * torch.exp(torch.randn(1024, generator=gen) * 0.5)
    x[:, torch.randperm(1024, generator=gen)[:8]] *= 8
    x = x.to(torch.bfloat16)
    per_token, per_channel = make_codec("int8"), make_codec("int8:axis=0")
    assert len(per_token.encode(x)) == len(per_channel.encode(x))
    err = {c.spec(): relative_error(x, decode(c.encode(x))) for c in (per_token, per_channel)}
    assert err[per_channel.spec()] < 0.5 * err[per_token.spec()] < 0.01, err
    for candidates in ("int8|int8:axis=0", "int8:axis=0|int8"):
        chosen, payload = make_codec(f"auto:candidates={candidates}").choose(x)
        assert chosen.spec() == per_channel.spec()
        assert relative_error(x, decode(payload)) == err[per_channel.spec()]
    chosen, _ = make_codec("auto").choose(x)  # the defaults list both
    assert chosen.spec() == per_channel.spec()
    # under a budget the first listed meets with room (its error at most RANK_ABOVE of it), the rest are not
    # screened to rank them: the first is taken
    roomy = err[per_token.spec()] / auto.RANK_ABOVE * 1.5
    assert make_codec(f"auto:max_error={roomy},candidates=int8|int8:axis=0").choose(x)[0].spec() == per_token.spec()
    # without a sample to rank them on (a small tensor), the listed order decides among near-equal sizes
    small = x[:64, :128].contiguous()
    assert small.numel() < auto.SAMPLE_MIN_ELEMS
    assert make_codec("auto:candidates=int8|int8:axis=0").choose(small)[0].spec() == per_token.spec()
    # a candidate more accurate but larger (per channel of a KV chunk: groups of its 2 layers) does not win
    kv = make_tensor((2, 2, 4, 128, 64), torch.bfloat16, "normal", 2)
    assert make_codec("auto:candidates=int8:axis=0|int8").choose(kv)[0].spec() == per_token.spec()


def test_auto_with_nan_stays_lossless():
    x = torch.tensor([1.0, float("nan"), 2.0])
    chosen, payload = make_codec("auto").choose(x)
    assert chosen.lossless
    assert torch.equal(bits(x), bits(decode(payload)))


def test_integer_tensors_are_stored_exactly_by_quantizers():
    ids = torch.arange(-5, 300, dtype=torch.int64).reshape(5, 61)
    for spec in ["int8", "int4", "fp8", "fp16", "lowrank", "auto"]:
        payload = make_codec(spec).encode(ids)
        assert unpack_payload(payload)[0] == "none"
        assert torch.equal(decode(payload), ids)


@settings(max_examples=20, deadline=None)
@given(x=float_tensors(dtypes=[torch.float32, torch.bfloat16]))
def test_transcode_int8_to_int4(x):
    int8, int4 = make_codec("int8"), make_codec("int4")
    x8 = decode(int8.encode(x))
    moved = transcode(int8.encode(x), "int4")
    assert unpack_payload(moved)[0] == "int4"
    y = decode(moved)
    assert_same_frame(x, y)
    n, n8 = x.double().norm().item(), x8.double().norm().item()
    allowed = int8.error_bound(x) + (int4.error_bound(x8) * n8 / n if n else 0.0)
    assert relative_error(x, y) <= allowed + 1e-12


def test_int4_payload_is_about_a_quarter_of_bf16():
    x = torch.randn(64, 1024).bfloat16()
    ratio = x.numel() * 2 / len(make_codec("int4").encode(x))
    assert 3.5 <= ratio < 4
    ratio8 = x.numel() * 2 / len(make_codec("int8").encode(x))
    assert 1.9 <= ratio8 < 2


def test_kv_residual_window_is_exact():
    x = make_tensor((2, 2, 3, 40, 16), torch.bfloat16, "normal", 7)
    y = decode(make_codec("kv-int4:residual=8").encode(x))
    assert torch.equal(bits(x[..., 32:, :]), bits(y[..., 32:, :]))
    assert not torch.equal(x[..., :32, :], y[..., :32, :])


def test_kv_keys_per_channel_beats_generic_per_token_on_outlier_keys():
    # why the KV layout exists: one outlier key channel ruins per-token int4 scales
    x = make_tensor((2, 2, 4, 128, 64), torch.float32, "normal", 3)
    x[:, 0, :, :, 5] *= 50
    # compare on the ordinary channels: per-token scales sized by the outlier flush them to zero
    keys = x[:, 0, ..., 6:]
    kv = relative_error(keys, decode(make_codec("kv-int4").encode(x))[:, 0, ..., 6:])
    generic = relative_error(keys, decode(make_codec("int4").encode(x))[:, 0, ..., 6:])
    assert kv < generic / 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_to_device_argument(dtype):
    x = torch.randn(3, 5).to(dtype)
    for spec in ["none", "int8", "int4", "fp8", "bf16", "sparse", "lowrank", "int8+zstd"]:
        assert decode(make_codec(spec).encode(x), device="cpu").device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["none", "int8", "int4", "fp8", "kv-int4", "bf16", "sparse", "lowrank", "auto"])
def test_cuda_round_trip_stays_on_device(spec):
    x = torch.randn(1, 2, 2, 16, 32, device="cuda")
    codec = make_codec(spec)
    y = decode(codec.encode(x), x.device)
    assert y.device == x.device and y.shape == x.shape
    assert relative_error(x, y) <= (codec.error_bound(x) if spec != "auto" else 0.02)
    assert decode(codec.encode(x)).device.type == "cpu"
    assert not math.isnan(relative_error(x, y))
