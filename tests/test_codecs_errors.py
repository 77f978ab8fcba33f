"""Codec errors: unknown names and bad params name the valid options; bad payloads never decode to garbage."""

from __future__ import annotations

import struct

import pytest
import torch

from qwen3vl_ray.codecs import decode, make_codec, pack_payload, unpack_payload
from qwen3vl_ray.codecs.base import tensor_bytes
from qwen3vl_ray.errors import CodecError


def test_unknown_codec_lists_the_valid_ones():
    with pytest.raises(CodecError, match="unknown codec 'int3'.*int4.*int8.*kv-int4"):
        make_codec("int3")


@pytest.mark.parametrize("spec, match", [
    ("int8:group=0", "group must be an integer in 1.."),
    ("int4:group=-3", "group must be an integer in 1.."),
    ("fp8:axis=x", "axis must be an integer"),
    ("int8:bits=3", "it takes: group, axis"),
    ("zstd:level=0", "level must be an integer in 1..22"),
    ("kv-int4:residual=-1", "residual must be an integer >= 0"),
    ("lowrank:max_error=1.5", r"max_error must be a number in \(0, 1\)"),
    ("auto:max_error=-0.1", r"max_error must be a number in \[0, 1\)"),
    ("auto:candidates=int8|auto", "cannot list itself"),
    ("auto:candidates=int8|int9", "unknown codec 'int9'"),
    ("int8+int4", "only byte compressors can: zstd"),
    ("int8+zstd:level=99", "level must be"),
])
def test_bad_params_name_what_is_allowed(spec, match):
    with pytest.raises(CodecError, match=match):
        make_codec(spec)


@pytest.mark.parametrize("spec", ["none", "zstd:level=5", "fp16", "bf16", "int8:group=64,axis=0", "int4", "fp8:group=32",
                                  "kv-int4:group=32,residual=16", "lowrank:max_error=0.05", "sparse", "int8+zstd",
                                  "auto", "auto:max_error=0.1,candidates=int8|int4|sparse"])
def test_spec_rebuilds_the_same_codec(spec):
    codec = make_codec(spec)
    again = make_codec(codec.spec())
    assert type(again) is type(codec) and again.spec() == codec.spec()


def test_axis_out_of_range_at_encode():
    with pytest.raises(CodecError, match=r"axis 2 out of range for a 2-d tensor \(allowed -2..1\)"):
        make_codec("int8:axis=2").encode(torch.randn(3, 4))


def test_kv_codec_names_the_layout_it_expects():
    with pytest.raises(CodecError, match=r"\[\.\.\., 2\(k/v\), kv_heads, tokens, head_dim\]"):
        make_codec("kv-int8").encode(torch.randn(3, 4, 5, 6))


@pytest.mark.parametrize("spec", ["int8", "int4", "fp8", "kv-int8", "kv-int4", "lowrank", "int8+zstd"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_refused_by_quantizers(spec, bad):
    x = torch.randn(1, 2, 2, 8, 4)
    x[0, 1, 1, 7, 3] = bad
    with pytest.raises(CodecError, match="NaN or inf"):
        make_codec(spec).encode(x)


def test_fp16_overflow_is_refused():
    with pytest.raises(CodecError, match="overflows torch.float16"):
        make_codec("fp16").encode(torch.tensor([1.0, 1e6]))


@pytest.fixture
def payload() -> bytearray:
    return make_codec("int8").encode(torch.randn(8, 64))


def test_unknown_format_version(payload):
    payload[4:6] = struct.pack("<H", 99)
    with pytest.raises(CodecError, match="format version 99"):
        decode(payload)


def test_unknown_codec_version():
    x = torch.randn(4)
    p = pack_payload("none", 7, {"dtype": "float32", "shape": [4]}, [tensor_bytes(x)])
    with pytest.raises(CodecError, match="version 7 is not supported"):
        decode(p)


def test_payload_naming_an_unknown_codec():
    p = pack_payload("int3", 1, {}, [])
    with pytest.raises(CodecError, match="unknown codec 'int3'"):
        decode(p)


@pytest.mark.parametrize("cut", [1, 10, 100, -1])
def test_truncated_payload(payload, cut):
    with pytest.raises(CodecError, match="truncated|corrupt|magic"):
        decode(payload[:cut] if cut > 0 else payload[:cut])


def test_bad_magic(payload):
    payload[0:4] = b"XXXX"
    with pytest.raises(CodecError, match="bad magic"):
        decode(payload)


@pytest.mark.parametrize("where", [-1, -300, 30])
def test_flipped_byte_is_caught(payload, where):
    # a flip in the buffers or in the JSON meta: the checksum covers both
    payload[where] ^= 0x5A
    with pytest.raises(CodecError):
        decode(payload)


def test_meta_that_does_not_match_the_buffers():
    x = torch.randn(4, 8)
    # a well-formed payload whose meta claims a bigger tensor than its buffers hold
    p = make_codec("int8").encode(x)
    _, _, meta, bufs = unpack_payload(p)
    meta["groups"][0] = 400
    forged = pack_payload("int8", 1, meta, [bytes(b) for b in bufs])
    with pytest.raises(CodecError):
        decode(forged)


def test_corrupt_zstd_stream():
    p = make_codec("zstd").encode(torch.randn(64))
    _, _, meta, bufs = unpack_payload(p)
    junk = bytearray(bufs[0])
    junk[len(junk) // 2] ^= 0xFF
    with pytest.raises(CodecError):
        decode(pack_payload("zstd", 1, meta, [junk]))


def test_sparse_index_out_of_range():
    p = make_codec("sparse").encode(torch.tensor([0.0, 2.0, 0.0]))
    _, _, meta, bufs = unpack_payload(p)
    bad_idx = torch.tensor([9], dtype=torch.int32)
    with pytest.raises(CodecError, match="index out of range"):
        decode(pack_payload("sparse", 1, meta, [tensor_bytes(bad_idx), bytes(bufs[1])]))


def test_read_only_payload_decodes():
    x = torch.randn(3, 130)
    for spec in ["int8", "int4", "fp8", "bf16", "sparse", "lowrank", "int8+zstd"]:
        y = decode(bytes(make_codec(spec).encode(x)))
        assert y.shape == x.shape
