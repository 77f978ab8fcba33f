"""Lossless codecs: zstd over any payload (cold tiers) and sparse values + indices."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import zstandard

from qwen3vl_ray.codecs import groups as G
from qwen3vl_ray.codecs.base import (
    Codec, decode, dtype_from_name, dtype_name, make_codec, pack_payload, register_codec,
    tensor_bytes,
)
from qwen3vl_ray.errors import CodecError


@register_codec("zstd")
class ZstdCodec(Codec):
    """zstd (level 1..22, default 3) over the payload of ``inner`` (default ``none``: the raw bytes).

    ``make_codec("int8+zstd")`` builds ``ZstdCodec(inner=int8)``; its error bound is the inner codec's.
    """

    lossless = True

    def __init__(self, level: int = 3, inner: Codec | str | None = None):
        if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= 22:
            raise CodecError(f"codec 'zstd': level must be an integer in 1..22, got {level!r}")
        self.level = level
        self.inner = make_codec(inner)
        self.lossless = self.inner.lossless

    def wrap(self, inner: Codec) -> "ZstdCodec":
        return ZstdCodec(self.level, inner)

    def spec(self) -> str:
        return f"{self.inner.spec()}+zstd:level={self.level}" if self.inner.name != "none" else f"zstd:level={self.level}"

    def encode(self, tensor: torch.Tensor) -> bytearray:
        inner = self.inner.encode(tensor)
        packed = zstandard.ZstdCompressor(level=self.level).compress(inner)
        meta = {"inner_len": len(inner), "level": self.level}
        return pack_payload(self.name, self.version, meta, [packed])

    def decode_parts(self, meta: dict[str, Any], buffers, device) -> torch.Tensor:
        n = int(meta["inner_len"])
        try:
            inner = zstandard.ZstdDecompressor().decompress(buffers[0], max_output_size=n)
        except zstandard.ZstdError as exc:
            raise CodecError(f"corrupt zstd payload: {exc}") from exc
        if len(inner) != n:
            raise CodecError(f"zstd payload inflated to {len(inner)} bytes, header says {n}: corrupt")
        return decode(bytearray(inner), device)

    def error_bound(self, tensor: torch.Tensor) -> float:
        return self.inner.error_bound(tensor)


@register_codec("sparse")
class SparseCodec(Codec):
    """Bit-exact values + flat indices of every element whose bit pattern is nonzero (-0.0 is kept).

    Indices are int32 below 2**31 elements, else int64; worth it below about 1/3 (int32) nonzero density.
    """

    lossless = True

    def encode(self, tensor: torch.Tensor) -> bytearray:
        x = tensor.detach().reshape(-1)
        if x.dtype.is_complex:
            raise CodecError(f"codec 'sparse' does not take complex tensors ({x.dtype})")
        bits = x
        if x.is_floating_point():
            # compare bit patterns, not values: -0.0 must survive for the codec to be bit-exact
            bits = x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
        idx = torch.nonzero(bits != 0).reshape(-1)
        idx_dtype = torch.int32 if x.numel() < 2 ** 31 else torch.int64
        vals = x[idx]
        meta = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "nnz": int(idx.numel()),
                "index_dtype": dtype_name(idx_dtype)}
        return pack_payload(self.name, self.version, meta, [tensor_bytes(idx.to(idx_dtype)), tensor_bytes(vals)])

    def decode_parts(self, meta: dict[str, Any], buffers, device) -> torch.Tensor:
        dtype = dtype_from_name(meta["dtype"])
        nnz = int(meta["nnz"])
        numel = int(np.prod(meta["shape"], dtype=np.int64))
        idx = G.buffer_tensor(buffers[0], dtype_from_name(meta["index_dtype"]), [nnz]).to(torch.int64)
        vals = G.buffer_tensor(buffers[1], dtype, [nnz])
        if nnz and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise CodecError(f"sparse payload index out of range 0..{numel - 1}: corrupt")
        out = torch.zeros(numel, dtype=dtype, device=device or "cpu")
        out[idx.to(out.device)] = vals.to(out.device)
        return out.reshape(meta["shape"])
