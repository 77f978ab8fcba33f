"""The fused numba kernels write byte-identical payloads to the torch paths and decode bit for bit like them.

The torch paths stay the oracle: :mod:`blocked` (today's CPU bytes) and :mod:`groups` (the whole-tensor
reference; its all-zero groups carry a -0.0 scale, which decodes the same). Chunks are shrunk to a few groups
so small tensors cross many chunk boundaries (odd groups, padded last groups, int4 pairs across chunks).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3vl_ray.codecs import base, blocked, decode, fused, make_codec
from qwen3vl_ray.codecs.groups import TINY
from qwen3vl_ray.errors import CodecError
from tests.helpers_threads import run_in_threads
from tests.test_codecs_inputs import float_tensors, kv_tensors, make_tensor

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not installed")

GENERIC = ["int8", "int4", "int8:group=7,axis=0", "int4:group=3", "int4:group=5,axis=0", "int8:group=1", "int4:group=1"]
KV = ["kv-int8", "kv-int4", "kv-int8:group=8,residual=5", "kv-int4:group=3,residual=2", "kv-int4:group=16,residual=100"]
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads and the sign of zero included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


def fused_and_torch(spec: str, x: torch.Tensor, chunk: int):
    """(payload, decoded) from the fused kernels with ``chunk``-element chunks, then from the torch path."""
    codec = make_codec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "CHUNK_ELEMS", chunk)
        # uninitialized payload memory: any byte the kernels forget shows up as a mismatch
        mp.setattr(base, "UNINIT_MIN", 0)
        mp.setattr(blocked, "quantize", _must_not_run)
        mp.setattr(blocked, "dequantize", _must_not_run)
        fast = codec.encode(x)
        fast_y = decode(fast)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "ENABLED", False)
        ref = codec.encode(x)
        ref_y = decode(ref)
        fast_by_torch = decode(fast)
    assert same_bits(fast_by_torch, ref_y), "the torch path decodes a fused payload differently"
    return (fast, fast_y), (ref, ref_y)


def _must_not_run(*args, **kwargs):
    raise AssertionError("the torch blocked path ran where the fused kernel should have")


def _check(spec: str, x: torch.Tensor, chunk: int) -> None:
    try:
        (fast, fy), (ref, ry) = fused_and_torch(spec, x, chunk)
    except CodecError as exc:
        # refused (non-finite, fp16 overflow...): the torch path must refuse too
        with pytest.MonkeyPatch.context() as mp, pytest.raises(CodecError):
            mp.setattr(fused, "ENABLED", False)
            make_codec(spec).encode(x)
        assert "NaN or inf" in str(exc)
        return
    assert bytes(fast) == bytes(ref)
    assert same_bits(fy, ry)


@pytest.mark.parametrize("spec", GENERIC)
@settings(max_examples=25, deadline=None)
@given(x=float_tensors(), chunk=st.sampled_from([1, 2, 7, 64, 1 << 15]))
def test_fused_matches_torch_generic(spec, x, chunk):
    _check(spec, x.contiguous(), chunk)


@pytest.mark.parametrize("spec", KV)
@settings(max_examples=25, deadline=None)
@given(x=kv_tensors(), chunk=st.sampled_from([1, 2, 7, 64, 1 << 15]))
def test_fused_matches_torch_kv(spec, x, chunk):
    _check(spec, x.contiguous(), chunk)


@pytest.mark.parametrize("spec", ["int8", "int4:axis=0", "kv-int4"])
def test_non_contiguous_input_takes_the_torch_path(spec):
    # a strided view is not what the kernels index: the blocked torch path handles it, same bytes as a copy
    x = make_tensor((2, 2, 3, 16, 8), torch.bfloat16, "outliers", 1, "transpose")
    assert not x.is_contiguous()
    assert bytes(make_codec(spec).encode(x)) == bytes(make_codec(spec).encode(x.contiguous()))


@pytest.mark.parametrize("spec", ["int8", "int4", "int8:axis=0", "kv-int8", "kv-int4", "kv-int4:residual=3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["first", "last"])
def test_non_finite_is_refused(spec, dtype, bad, where):
    x = torch.randn(2, 2, 3, 8, 8).to(dtype)
    # "last" lands in kv's residual window (tokens kept as is) when there is one
    x.view(-1)[0 if where == "first" else -1] = bad
    with pytest.raises(CodecError, match="NaN or inf"):
        make_codec(spec).encode(x)


def test_float64_beyond_float32_range_is_refused():
    x = torch.ones(4, 128, dtype=torch.float64)
    x[2, 5] = 1e300  # finite in float64, inf in the float32 the codecs compute in
    with pytest.raises(CodecError, match="NaN or inf"):
        make_codec("int8").encode(x)


@pytest.mark.parametrize("spec", ["int8", "int4", "kv-int8", "kv-int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_adversarial_groups(spec, dtype):
    # one tensor with every awkward group: all-equal, all-zero, -0.0, at and just above the TINY threshold,
    # exact half-step ties (round half to even), subnormal-sized, and an outlier channel
    x = torch.randn(2, 2, 4, 32, 16, dtype=torch.float32)
    x[0, 0, 0] = 3.0
    x[0, 0, 1] = 0.0
    x[0, 1, 0] = -0.0
    x[0, 1, 1] = float(np.float32(TINY))
    x[0, 1, 2] = float(np.nextafter(np.float32(TINY), np.float32(1)))
    x[1, 0, 0] = torch.arange(32 * 16, dtype=torch.float32).view(32, 16) % 9 - 4.5  # ties at amax 4.5
    x[1, 0, 1] = 1e-3
    x[1, 1, :, :, 3] *= 1000  # outlier channel
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    _check(spec, x.to(dtype), 64)


@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 8, 11, 13])
@pytest.mark.parametrize("spec", ["kv-int8:group=8", "kv-int4:group=6,residual=1", "int8:group=5,axis=0", "int4:group=7,axis=0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_per_channel_groups_in_blocks_of_four_rows(spec, tokens, dtype):
    # the per-channel kernels take a group's rows four at a time, then the rest one by one: every remainder
    # (full groups, short last groups, groups under four rows), with the largest |x| of a channel in each row slot
    x = make_tensor((2, 2, 3, tokens, 10), torch.float32, "normal", 11)
    for r in range(tokens):
        x[..., r, r % 10] = 50.0 + r
        x[..., r, (r + 3) % 10] = -(60.0 + r)
    if not spec.startswith("kv"):
        x = x.reshape(-1, tokens * 10).t().contiguous()  # per-channel along the first axis
    _check(spec, x.to(dtype), 64)


@pytest.mark.parametrize("shape", [(1,), (3,), (1, 1), (5, 129), (7, 3, 1), (1, 2, 1, 1, 1), (2, 2, 1, 5, 3)])
@pytest.mark.parametrize("spec", ["int8", "int4", "int4:axis=0,group=2", "kv-int4", "kv-int8:residual=1"])
def test_odd_shapes(spec, shape):
    x = make_tensor(shape, torch.bfloat16, "normal", 7)
    if spec.startswith("kv") and (len(shape) < 4 or shape[-4] != 2):
        return
    _check(spec, x, 2)


@pytest.mark.parametrize("spec", ["int8", "kv-int4"])
def test_torch_payloads_still_decode(spec):
    # a payload written by the torch paths (today's files) decodes through the kernels to the same bits
    x = make_tensor((2, 2, 4, 40, 16), torch.bfloat16, "outliers", 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "ENABLED", False)
        old = make_codec(spec).encode(x)
        want = decode(old)
    readonly = bytes(old)  # as read from disk: the kernels take read-only buffers too
    assert same_bits(decode(readonly), want)


def test_threads_take_turns():
    # numba's workqueue layer must never see two launches at once: many threads, the same bytes each time
    x = make_tensor((4, 2, 8, 64, 64), torch.bfloat16, "normal", 5)
    want = bytes(make_codec("kv-int4").encode(x))
    got = []

    def work():
        for _ in range(5):
            p = make_codec("kv-int4").encode(x)
            got.append(bytes(p) == want and same_bits(decode(p), decode(want)))

    errors = run_in_threads(work, 4)
    assert not errors and got == [True] * 20


def test_env_var_forces_the_torch_path():
    code = "from qwen3vl_ray.codecs import fused; print(fused.ENABLED, fused.available())"
    env = dict(os.environ, QWEN3VL_CODEC_KERNELS="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]



def test_full_width_vectors_only_where_the_user_chose_no_cpu_features():
    # AVX-512 hosts: the kernels compile for 512-bit vectors; a user's NUMBA_CPU_FEATURES is never overridden
    code = ("import numba; from numba.core import codegen; from qwen3vl_ray.codecs import fused; "
            "print(int('+avx512f' in codegen.get_host_cpu_features().split(','))); print(numba.config.CPU_FEATURES)")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CPU_FEATURES"}
    avx512, features = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      check=True).stdout.split("\n")[:2]
    assert features.endswith(",-prefer-256-bit") if avx512 == "1" else features == "None"
    env["NUMBA_CPU_FEATURES"] = "+sse2"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[1] == "+sse2"

@pytest.mark.parametrize("spec", ["none", "int8", "int4:axis=0", "kv-int8", "kv-int4:residual=3", "fp8", "bf16", "int8+zstd", "zstd"])
def test_decode_into_preallocated_out(spec):
    x = make_tensor((2, 2, 3, 16, 8), torch.float32, "outliers", 2)
    p = make_codec(spec).encode(x)
    want = decode(p)
    # a contiguous out takes the direct path; a strided one (a transposed view) the decode-and-copy fallback
    for out in (torch.full_like(x, 7.0), torch.full((2, 2, 3, 8, 16), 7.0).transpose(-1, -2)):
        got = decode(p, out=out)
        assert got is out and same_bits(got.contiguous(), want)


@pytest.mark.parametrize("spec", ["int8", "kv-int4", "int8+zstd", "none"])
def test_decode_into_wrong_out_is_a_value_error(spec):
    x = make_tensor((2, 2, 3, 16, 8), torch.bfloat16, "normal", 2)
    p = make_codec(spec).encode(x)
    with pytest.raises(ValueError, match=r"out is float32 \[2, 2, 3, 16, 8\], the payload holds bfloat16"):
        decode(p, out=torch.empty(x.shape, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"out is bfloat16 \[2, 2, 3, 8, 16\]"):
        decode(p, out=torch.empty((2, 2, 3, 8, 16), dtype=torch.bfloat16))


def _encode_in_child(conn, spec, x):
    try:
        p = make_codec(spec).encode(x)
        conn.send((bytes(p), decode(p).view(torch.int16).numpy().tobytes()))  # plain bytes: no tensor sharing
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(repr(exc))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_encodes_after_the_parent_did():
    # GNU OpenMP is not fork-safe: the child must not launch a parallel kernel after the parent has (it would
    # abort); it runs the serial twins and writes the same bytes
    import multiprocessing as mp

    x = make_tensor((2, 2, 3, 16, 8), torch.bfloat16, "outliers", 4)
    want = bytes(make_codec("kv-int4").encode(x))
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_encode_in_child, args=(child, "kv-int4", x))
    proc.start()
    assert parent.poll(120), "the forked child hung"
    got = parent.recv()
    proc.join(10)
    assert not isinstance(got, str), got
    assert got[0] == want and got[1] == decode(want).view(torch.int16).numpy().tobytes()
    assert proc.exitcode == 0


@pytest.mark.parametrize("spec", ["int8", "int4:group=5", "int8:axis=0,group=3", "kv-int8", "kv-int4:group=3,residual=2"])
@settings(max_examples=25, deadline=None)
@given(x=float_tensors() | kv_tensors(), chunk=st.sampled_from([2, 64, 1 << 15]))
def test_measured_error_is_relative_error(spec, x, chunk):
    # the error the kernel sums while quantizing (float32 per group, rounded up by 2^-20) is the decoded
    # tensor's error, never below it
    got = _error_with_payload(spec, "encode_measured", x, chunk)
    if got is None:
        return
    want, err = got
    assert want <= err <= want * (1 + 1e-5) + 2e-6


def _error_with_payload(spec: str, method: str, x: torch.Tensor, chunk: int, **kw) -> tuple[float, float] | None:
    """(the decoded tensor's relative error, what ``codec.<method>`` reported with its payload), prange chunks of
    ``chunk`` elements; checks the payload is the plain encode's. None where the codec refuses ``x`` or no fused
    path runs (integer, empty, no KV head part)."""
    from qwen3vl_ray.codecs import relative_error

    x = x.contiguous()
    codec = make_codec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "CHUNK_ELEMS", chunk)
        try:
            payload, err = getattr(codec, method)(x, **kw)
        except CodecError:
            return None
    assert bytes(payload) == bytes(codec.encode(x))
    return None if err is None else (relative_error(x, decode(payload)), err)


def test_auto_screens_large_tensors_on_a_sample_and_keeps_the_budget():
    from qwen3vl_ray.codecs import auto, relative_error

    x = make_tensor((8, 2, 4, 64, 64), torch.bfloat16, "normal", 9)
    x[:, 0, :, :, 5] *= 30  # an outlier key channel
    assert x.numel() >= auto.SAMPLE_MIN_ELEMS
    part = auto.sample(x)
    # whole slices of the layers and heads: the k/v axis and the grouped (tokens, head_dim) dims stay whole
    assert part.shape[1] == 2 and part.shape[-2:] == x.shape[-2:] and part.numel() * 8 <= x.numel()
    assert auto.sample(x, axis0=True).shape[:-1] == x.shape[:-1]
    for budget, name in ((0.02, "kv-int8"), (0.15, "kv-int4")):
        chosen, payload = make_codec(f"auto:max_error={budget}").choose(x)
        assert chosen.name == name
        assert relative_error(x, decode(payload)) <= budget


def test_kernels_leave_torch_thread_count_alone():
    # numba's OpenMP layer and torch share one OpenMP runtime: a launch must not change torch's setting
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        x = make_tensor((2, 2, 3, 16, 8), torch.bfloat16, "normal", 6)
        decode(make_codec("kv-int8").encode(x))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_auto_remembers_a_kinds_winner_and_still_keeps_the_budget(monkeypatch):
    from qwen3vl_ray.codecs import auto, relative_error

    codec = make_codec("auto:max_error=0.15")
    fresh = []
    real = codec._choose_afresh
    monkeypatch.setattr(codec, "_choose_afresh", lambda t, fb: fresh.append(1) or real(t, fb))
    xs = [make_tensor((8, 2, 4, 64, 64), torch.bfloat16, "normal", seed) for seed in range(3)]
    for x in xs:
        chosen, payload = codec.choose(x)
        assert chosen.name == "kv-int4" and relative_error(x, decode(payload)) <= 0.15
    assert len(fresh) == 1  # the later tensors of the kind went straight to the remembered winner
    # a tensor of the same kind that the winner cannot hold within the budget is chosen afresh, within it
    spiky = make_tensor((8, 2, 4, 64, 64), torch.bfloat16, "normal", 7)
    spiky[:, 1, :, :, ::32] = 12.0  # one outlier per value group: int4 steps of 12/7 swamp the rest
    chosen, payload = codec.choose(spiky)
    assert len(fresh) == 2 and chosen.name != "kv-int4"
    assert relative_error(spiky, decode(payload)) <= 0.15
    # the spiky tensor's winner now stands for the kind; it serves RESCREEN_EVERY tensors, then the kind is
    # screened again and the codec the plain tensors prefer is found again
    names = [codec.choose(xs[0])[0].spec() for _ in range(auto.RESCREEN_EVERY + 1)]
    assert names == [chosen.spec()] * auto.RESCREEN_EVERY + [make_codec("kv-int4").spec()] and len(fresh) == 3
    # another shape is another kind
    codec.choose(make_tensor((4, 2, 4, 64, 64), torch.bfloat16, "normal", 1))
    assert len(fresh) == 4


@pytest.mark.parametrize("spec", ["int8", "int4:group=5", "int8:axis=0,group=3", "int4:group=1", "kv-int8", "kv-int4:group=3,residual=2"])
@settings(max_examples=30, deadline=None)
@given(x=float_tensors() | kv_tensors(), chunk=st.sampled_from([2, 64, 1 << 15]), bound=st.sampled_from(list(fused.BOUNDS)))
def test_error_bound_is_above_relative_error(spec, x, chunk, bound):
    # the bounds auto takes a remembered winner on (cheap, full and steps): never below the decoded tensor's
    # true error, same bytes
    got = _error_with_payload(spec, "encode_bounded", x, chunk, bound=bound)
    if got is not None:
        want, bound = got
        assert bound >= want


def _adversarial(dtype: torch.dtype) -> torch.Tensor:
    """Awkward groups for the bound: all-equal, zeros, TINY-sized, ties, subnormal-sized, outlier channel,
    and values that underflow the output dtype (fp16 subnormals) or float32 (float64 inputs)."""
    x = torch.randn(2, 2, 4, 32, 16, dtype=torch.float64)
    x[0, 0, 0] = 3.0
    x[0, 0, 1] = 0.0
    x[0, 1, 0] = float(np.float32(TINY))
    x[0, 1, 1] = float(np.nextafter(np.float32(TINY), np.float32(1)))
    x[0, 1, 2] *= 1e-6  # fp16 subnormals
    x[0, 1, 3, :, 1::2] *= 1e-45 if dtype == torch.float64 else 1e-4  # float32 underflow next to normal values
    x[1, 0, 0] = torch.arange(32 * 16, dtype=torch.float64).view(32, 16) % 9 - 4.5  # ties at amax 4.5
    x[1, 0, 1] = 1e-3
    x[1, 1, :, :, 3] *= 1000  # outlier channel
    x[1, 1, 2, 5, :] = 7.0  # an all-equal row
    return x.clamp(-6e4, 6e4).to(dtype) if dtype == torch.float16 else x.to(dtype)


@pytest.mark.parametrize("spec", ["int8", "int4", "int8:axis=0", "int4:group=1", "kv-int8", "kv-int4", "kv-int4:residual=3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 1e-5, 1e-30, 1e4])
@pytest.mark.parametrize("bound", list(fused.BOUNDS))
def test_error_bound_adversarial(spec, dtype, scale, bound):
    from qwen3vl_ray.codecs import relative_error

    x = (_adversarial(torch.float64) * scale).to(dtype)
    if dtype == torch.float16:
        x = _adversarial(torch.float64).mul(scale).clamp(-6e4, 6e4).to(dtype)
    codec = make_codec(spec)
    payload, err = codec.encode_bounded(x, bound)
    assert bytes(payload) == bytes(codec.encode(x))
    true = relative_error(x, decode(payload))
    assert err >= true
    _, measured = codec.encode_measured(x)
    assert err >= measured * (1 - 1e-5) - 2e-6  # the exact sums sit below it too
    if bound == "steps":  # the exact steps never exceed half a step each: never looser than the full bound
        assert err <= codec.encode_bounded(x, "full")[1] * (1 + 1e-6)


@pytest.mark.parametrize("spec", ["int8", "int4", "int8:axis=0", "kv-int8", "kv-int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_cheap_bound_squares_enough_of_the_norm(spec, dtype):
    # the cheap bound squares only the largest of each two inputs along a channel, or of each four in a row's
    # group (the default group of 128 has a constant trip count; 131 leaves a tail of 3): never tighter than the
    # full bound, which squares them all, and on Gaussian inputs, which keep ~62% (four) or ~82% (two) of
    # their squared norm so, at most ~1.27x above it (1.35 allowed; squaring every other group's inputs, as
    # before, was ~1.37x, and the groups' largest alone ~4x)
    from qwen3vl_ray.codecs import relative_error

    gen = torch.Generator().manual_seed(7)
    shape = (260, 3, 131) if "axis=0" in spec else (2, 2, 4, 140, 131)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    codec = make_codec(spec)
    payload, cheap = codec.encode_bounded(x, "cheap")
    assert bytes(payload) == bytes(codec.encode(x))
    full = codec.encode_bounded(x, "full")[1]
    assert relative_error(x, decode(payload)) <= full <= cheap <= 1.35 * full


@pytest.mark.parametrize("spec", ["int8", "int4", "int8:axis=0", "kv-int8", "kv-int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_amax_bound_reads_the_row_groups_norm_from_their_scales(spec, dtype):
    # the amax bound counts only each row group's largest input (from its scale; along a channel it is the cheap
    # bound): same bytes, never tighter than the cheap bound, the same as it per channel, and on a KV chunk whose
    # keys carry outlier channels (most of the norm, per channel) within a few percent of it, while on row
    # groups of Gaussian inputs it is much looser (a group of 128 keeps ~1/15 of its squared norm)
    from qwen3vl_ray.codecs import relative_error

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 2, 4, 128, 128, generator=gen, dtype=torch.float64)
    x[:, 0, :, :, :4] = x[:, 0, :, :, :4] * 4 + 15  # outlier key channels, steady across tokens
    x[:, 1] *= 0.5
    x = x.to(dtype)
    codec = make_codec(spec)
    payload, amax = codec.encode_bounded(x, "amax")
    assert bytes(payload) == bytes(codec.encode(x))
    cheap = codec.encode_bounded(x, "cheap")[1]
    assert relative_error(x, decode(payload)) <= cheap <= amax
    if "axis=0" in spec:
        assert amax == cheap
    elif spec.startswith("kv"):
        assert amax <= 1.05 * cheap
    else:
        assert amax >= 1.15 * cheap


@pytest.mark.parametrize("spec", ["int8", "int4:axis=0", "kv-int8"])
def test_an_unknown_error_bound_is_refused_by_name(spec):
    x = torch.randn(2, 2, 4, 16, 32).to(torch.bfloat16)
    with pytest.raises(CodecError, match=r"unknown error bound 'tight'; one of amax, cheap, full, steps"):
        make_codec(spec).encode_bounded(x, "tight")
    with pytest.raises(CodecError, match="unknown error bound None"):
        make_codec(spec).encode_bounded(x, None)


def test_auto_takes_a_remembered_winner_on_its_cheapest_bound_that_proves_the_budget(monkeypatch):
    # a winner well within the budget: the next tensors of its kind cost the amax bounded encode only; one
    # nearer the budget falls to the cheap bound, one nearer still to the full bound, then the steps bound, then
    # the exact measure, each on the same tensor, and the kind then starts at the check that served; every
    # payload stays within the budget
    from qwen3vl_ray.codecs import relative_error
    from qwen3vl_ray.codecs.kv import KVQuantCodec

    calls = []
    real_m, real_b = KVQuantCodec.encode_measured, KVQuantCodec.encode_bounded
    monkeypatch.setattr(KVQuantCodec, "encode_measured", lambda self, t: calls.append("exact") or real_m(self, t))
    monkeypatch.setattr(KVQuantCodec, "encode_bounded",
                        lambda self, t, bound="full": calls.append(bound) or real_b(self, t, bound))
    xs = [make_tensor((8, 2, 4, 64, 64), torch.bfloat16, "normal", seed) for seed in range(4)]
    kv4 = make_codec("kv-int4")
    # kv-int4 errs ~0.108 here, the steps bound ~0.112, the full one ~0.19, the cheap one ~0.23, the amax one
    # ~0.28 (values as large as the keys: their groups' largest inputs alone hold a small share of the norm): a
    # budget between each two of them (over every remembered tensor) is first met by the looser of the two
    errs = [relative_error(x, decode(kv4.encode(x))) for x in xs]
    bounds = {b: [kv4.encode_bounded(x, b)[1] for x in xs] for b in ("steps", "full", "cheap", "amax")}
    levels = [errs, bounds["steps"], bounds["full"], bounds["cheap"], bounds["amax"], [0.5]]
    assert all(max(lo) < min(hi) for lo, hi in zip(levels, levels[1:])), levels
    between = [(max(lo) + min(hi)) / 2 for lo, hi in zip(levels, levels[1:])]
    for budget, want in ((between[4], ["amax"] * 3), (between[3], ["amax", "cheap", "cheap", "cheap"]),
                         (between[2], ["amax", "cheap", "full", "full", "full"]),
                         (between[1], ["amax", "cheap", "full", "steps", "steps", "steps"]),
                         (between[0], ["amax", "cheap", "full", "steps", "exact", "exact", "exact"])):
        codec = make_codec(f"auto:max_error={budget}")
        assert codec.choose(xs[0])[0].name == "kv-int4"
        calls.clear()
        for x in xs[1:]:
            chosen, payload = codec.choose(x)
            assert chosen.name == "kv-int4" and relative_error(x, decode(payload)) <= budget
        assert calls == want, budget
    # without the fused path there is no bound at all: the first remembered tensor tries once, the rest go
    # straight to the exact measure
    monkeypatch.setattr(fused, "ENABLED", False)
    codec = make_codec("auto:max_error=0.30")
    assert codec.choose(xs[0])[0].name == "kv-int4"
    calls.clear()
    for x in xs[1:]:
        chosen, payload = codec.choose(x)
        assert chosen.name == "kv-int4" and relative_error(x, decode(payload)) <= 0.30
    assert calls == ["amax", "exact", "exact", "exact"]


def test_auto_rescreen_interval_adapts_and_still_catches_a_changed_winner(monkeypatch):
    # re-screens that confirm the winner double the interval up to RESCREEN_MAX; a winner that misses the budget is
    # replaced at once (the budget holds on every tensor); a kind whose data grows more compressible is re-screened
    # within RESCREEN_MAX tensors, and the interval then starts over at RESCREEN_EVERY
    from qwen3vl_ray.codecs import auto, relative_error

    monkeypatch.setattr(auto, "RESCREEN_EVERY", 2)
    monkeypatch.setattr(auto, "RESCREEN_MAX", 8)
    codec = make_codec("auto:max_error=0.15")
    fresh, names = [], []
    real = codec._choose_afresh
    monkeypatch.setattr(codec, "_choose_afresh", lambda t, fb: fresh.append(len(names)) or real(t, fb))

    def run(x):
        chosen, payload = codec.choose(x)
        assert relative_error(x, decode(payload)) <= 0.15
        names.append(chosen.name)

    plain = [make_tensor((8, 2, 4, 64, 64), torch.bfloat16, "normal", seed) for seed in range(3)]
    spiky = make_tensor((8, 2, 4, 64, 64), torch.bfloat16, "normal", 7)
    spiky[:, 1, :, :, ::32] = 12.0  # one outlier per value group: kv-int4 misses the budget on it
    for i in range(30):
        run(plain[i % 3])
    # chosen at 0; then served 2, 4, 8, 8 tensors between the re-screens, each confirming kv-int4
    assert fresh == [0, 3, 8, 17, 26] and set(names) == {"kv-int4"}
    run(spiky)  # the remembered kv-int4 misses the budget: chosen afresh on this very tensor
    assert fresh[-1] == 30 and names[-1] != "kv-int4"
    bigger = names[-1]
    for _ in range(30):
        run(spiky)  # confirmed again and again: the interval grows back to the cap
    assert fresh[5:] == [30, 33, 38, 47, 56] and set(names[30:]) == {bigger}
    start = len(names)
    for i in range(12):
        run(plain[i % 3])
    # the next scheduled re-screen (within RESCREEN_MAX tensors) finds kv-int4 again; the interval resets to 2
    switch = names.index("kv-int4", start)
    assert switch - start <= auto.RESCREEN_MAX and fresh[-2:] == [switch, switch + 3]
    assert set(names[start:switch]) == {bigger} and set(names[switch:]) == {"kv-int4"}
