"""A payload whose header was corrupted is a ``CodecError``, whatever the corrupt fields make the decoder do.

Format version 2 checks a payload's digest after (or inside) the decode kernels, so the decoder reads an
unverified header first: a group size of 0, ``Infinity`` where a count belongs, a shape that is a number. Each
must come out as the payload's error (a disk-tier reader counts it as a corrupt entry), never as a
``ZeroDivisionError``, ``OverflowError`` or ``TypeError`` from somewhere inside.
"""

import pytest
import torch

from qwen3vl_ray.codecs import base, decode, make_codec
from qwen3vl_ray.errors import CodecError


def with_meta(payload: bytes, **changes) -> bytes:
    """``payload`` with its header's meta changed and its old digest kept (a corrupt header)."""
    name, version, meta, bufs, check = base._unpack(payload, verify=False)
    meta = dict(meta, **changes)  # a copy: _unpack's meta is the decoders' shared one
    header = base.payload_header(name, version, meta, [b.nbytes for b in bufs])
    return header + bytes(payload[check[0].nbytes:])


def encoded(spec: str, shape: tuple[int, ...]) -> tuple[bytes, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    return bytes(make_codec(spec).encode(x)), x


CASES = [
    ("int4:group=4", (3, 8), {"groups": [3, 8, 1, 0]}),  # one digit flipped: a zero group
    ("int8", (4, 5), {"groups": [4, 5, 1, 0]}),
    ("int8", (4, 64), {"groups": [4, 64, 1, float("inf")]}),  # json writes Infinity, and reads it back
    ("int8", (4, 64), {"groups": None}),
    ("int8", (4, 64), {"shape": 7}),
    ("int8", (4, 64), {"dtype": 5}),
    ("kv-int8", (1, 2, 2, 16, 8), {"cut": float("inf")}),
    ("kv-int8", (1, 2, 2, 16, 8), {"cut": "x"}),
    ("kv-int8", (1, 2, 2, 16, 8), {"shape": 5}),
    ("kv-int8", (1, 2, 2, 16, 8), {"v": None}),
]


@pytest.mark.parametrize("into_out", [False, True], ids=["new", "out"])
@pytest.mark.parametrize("spec,shape,changes", CASES, ids=[f"{c[0]}-{next(iter(c[2]))}" for c in CASES])
def test_a_corrupt_header_is_a_codec_error(spec, shape, changes, into_out):
    payload, x = encoded(spec, shape)
    bad = with_meta(payload, **changes)
    out = torch.empty_like(x) if into_out else None
    with pytest.raises(CodecError):
        decode(bad, out=out)


def test_a_header_whose_meta_is_no_object_is_a_codec_error():
    payload, x = encoded("int8", (4, 64))
    name, version, _, bufs, check = base._unpack(payload, verify=False)
    for not_an_object in (5, [1, 2], "x", None):
        header = base.payload_header(name, version, not_an_object, [b.nbytes for b in bufs])
        for out in (None, torch.empty_like(x)):
            with pytest.raises(CodecError):
                decode(header + bytes(payload[check[0].nbytes:]), out=out)


def test_an_intact_payload_still_decodes_exactly_as_before():
    for spec, shape, _ in CASES:
        payload, x = encoded(spec, shape)
        y = decode(payload)
        assert y.shape == x.shape and torch.equal(decode(payload, out=torch.empty_like(x)), y)


def test_a_callers_meta_is_its_own():
    # decoders share each header's parsed meta (parsed once per layout): what unpack_payload hands out is a copy
    payload, x = encoded("int4:group=4", (3, 8))
    want = decode(payload)
    meta = base.unpack_payload(payload)[2]
    meta["groups"][3] = 0
    meta["shape"] = 7
    assert torch.equal(decode(payload), want) and base.unpack_payload(payload)[2]["groups"] == [3, 8, 1, 4]
