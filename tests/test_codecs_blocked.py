"""The cache-blocked CPU kernels produce byte-identical payloads and values to the plain whole-tensor path.

Tiles are shrunk to a few dozen elements so small tensors cross many tile, row and group boundaries
(odd groups, padded last groups, rows larger than a tile, int4 pairs across tiles, KV slices whose
heads/layers cannot be merged into one view).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3vl_ray.codecs import base, blocked, decode, fused, make_codec, unpack_payload
from qwen3vl_ray.errors import CodecError
from tests.test_codecs_inputs import float_tensors, kv_tensors

GENERIC = ["int8", "int4", "int8:group=7,axis=0", "int4:group=3", "int4:group=5,axis=0", "int8:group=1"]
KV = ["kv-int8", "kv-int4", "kv-int8:group=8,residual=5", "kv-int4:group=3,residual=2", "kv-int4:group=16,residual=100"]


@pytest.fixture(autouse=True, scope="module")
def torch_paths():
    """These tests compare the two torch paths; the fused kernels have their own (test_codecs_fused.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "ENABLED", False)
        yield


def assert_same_payload(fast: bytearray, plain: bytearray) -> None:
    """Same codec, meta and code bytes; scales equal as numbers (an all-zero group's scale is +0.0 on the
    blocked path and -0.0 on the plain one, which decodes to -0.0; both are exact)."""
    (name, ver, meta, fbufs), (pname, pver, pmeta, pbufs) = unpack_payload(fast), unpack_payload(plain)
    assert (name, ver, meta) == (pname, pver, pmeta)
    assert len(fbufs) == len(pbufs)
    for i, (a, b) in enumerate(zip(fbufs, pbufs)):
        if name != "none" and (i % 2 == 1 and i < 4):  # scale buffers: float32
            fa, fb = (torch.from_numpy(np.frombuffer(bytes(v), dtype=np.float32).copy()) for v in (a, b))
            assert torch.equal(fa, fb)
        else:
            assert bytes(a) == bytes(b)


def both_paths(monkeypatch, spec: str, x: torch.Tensor, tile: int):
    """(payload, decoded) from the blocked kernels with ``tile``-element tiles, then from the plain path."""
    codec = make_codec(spec)
    monkeypatch.setattr(blocked, "TILE_ELEMS", tile)
    # uninitialized payload memory on the fast path: any byte the kernels forget shows up as a mismatch
    monkeypatch.setattr(base, "UNINIT_MIN", 0)
    fast = codec.encode(x)
    fast_y = decode(fast)
    monkeypatch.setattr(base, "UNINIT_MIN", 1 << 62)
    monkeypatch.setattr(blocked, "usable", lambda t: False)
    plain = codec.encode(x)
    plain_y = decode(plain)
    monkeypatch.undo()
    return (fast, fast_y), (plain, plain_y)


@pytest.mark.parametrize("spec", GENERIC)
@settings(max_examples=30, deadline=None)
@given(x=float_tensors(), tile=st.sampled_from([1, 2, 7, 64, 1000]))
def test_blocked_matches_plain_generic(spec, x, tile):
    with pytest.MonkeyPatch.context() as mp:
        try:
            (fast, fy), (plain, py) = both_paths(mp, spec, x, tile)
        except CodecError:
            return  # the property tests cover refusals; here both paths are compared on what they accept
    assert_same_payload(fast, plain)
    assert fy.shape == py.shape and fy.dtype == py.dtype and torch.equal(fy, py)


@pytest.mark.parametrize("spec", KV)
@settings(max_examples=30, deadline=None)
@given(x=kv_tensors(), tile=st.sampled_from([1, 2, 7, 64, 1000]))
def test_blocked_matches_plain_kv(spec, x, tile):
    with pytest.MonkeyPatch.context() as mp:
        (fast, fy), (plain, py) = both_paths(mp, spec, x, tile)
    assert_same_payload(fast, plain)
    assert fy.shape == py.shape and fy.dtype == py.dtype and torch.equal(fy, py)


@pytest.mark.parametrize("spec", ["int8", "int4", "kv-int8", "kv-int4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_blocked_refuses_non_finite_in_any_tile(monkeypatch, spec, bad):
    # the bad value sits in the last tile: the check runs after every tile, before the payload is returned
    monkeypatch.setattr(blocked, "TILE_ELEMS", 16)
    x = torch.randn(1, 2, 2, 8, 16, dtype=torch.bfloat16)
    x[0, 1, 1, 7, 15] = bad
    with pytest.raises(CodecError, match="NaN or inf"):
        make_codec(spec).encode(x)


def test_float64_beyond_float32_range_is_refused(monkeypatch):
    # float64 maxima are narrowed to float32 scales: 1e300 overflows, as it does on the plain path
    x = torch.ones(4, 8, dtype=torch.float64)
    x[2, 3] = 1e300
    with pytest.raises(CodecError, match="NaN or inf"):
        make_codec("int8").encode(x)


def test_large_decode_result_is_an_ordinary_tensor():
    # results over 4 MiB come from numpy (huge pages); they must behave like any torch tensor
    x = torch.randn(4, 2, 2, 64, 128, dtype=torch.bfloat16).repeat(4, 1, 1, 1, 1)  # 4 MiB
    y = decode(make_codec("kv-int8").encode(x))
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    y.add_(1)  # writable
    assert torch.isfinite(y.float()).all()


@pytest.mark.parametrize("spec", ["int8", "int4", "kv-int8", "kv-int4", "int8:axis=0", "kv-int8:residual=7"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tile", [1 << 12, 3 << 12, 1 << 15])
def test_uniform_tile_loops_match_plain(spec, dtype, tile):
    # KV-chunk geometry: whole-row tiles of equal size take the batched loops (_quantize_uniform /
    # _dequantize_uniform), a ragged last tile the general loop; both must equal the plain path
    gen = torch.Generator().manual_seed(tile)
    x = (torch.randn(3, 2, 2, 32, 64, generator=gen) * torch.logspace(-3, 2, 64)).to(dtype)
    x[1, 0, 1, :5] = 0  # all-zero groups: zero scales and zero codes on both paths
    with pytest.MonkeyPatch.context() as mp:
        calls = []
        real = blocked._quantize_uniform
        mp.setattr(blocked, "_quantize_uniform", lambda *a: (calls.append(1), real(*a)))
        (fast, fy), (plain, py) = both_paths(mp, spec, x, tile)
    assert calls, "the batched loop was not used"
    assert_same_payload(fast, plain)
    assert fy.shape == py.shape and fy.dtype == py.dtype and torch.equal(fy, py)
