"""Casts to fp16 / bf16: half the bytes of float32, exact for tensors already in the target dtype.

NaN and inf survive a cast; a finite value that overflows fp16 (|x| > 65504) raises CodecError rather
than silently becoming inf.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qwen3vl_ray.codecs import groups as G
from qwen3vl_ray.codecs.base import Codec, IdentityCodec, dtype_from_name, dtype_name, pack_payload, register_codec, tensor_bytes
from qwen3vl_ray.errors import CodecError


class CastCodec(Codec):
    target: torch.dtype = torch.float16

    def encode(self, tensor: torch.Tensor) -> bytearray:
        if not tensor.is_floating_point():
            return IdentityCodec().encode(tensor)
        y = tensor.detach().to(self.target)
        if not bool(torch.isfinite(y).all()) and bool(torch.isfinite(tensor).all()):
            big = float(tensor.detach().abs().max())
            raise CodecError(f"codec {self.name!r}: value {big:g} overflows {self.target} (max {torch.finfo(self.target).max:g}); use 'bf16' or 'int8'")
        meta = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}
        return pack_payload(self.name, self.version, meta, [tensor_bytes(y)])

    def decode_parts(self, meta: dict[str, Any], buffers, device) -> torch.Tensor:
        y = G.buffer_tensor(buffers[0], self.target, meta["shape"])
        if device is not None:
            y = y.to(device)
        out = y.to(dtype_from_name(meta["dtype"]))
        return out if out.data_ptr() != y.data_ptr() else out.clone()

    def error_bound(self, tensor: torch.Tensor) -> float:
        if not tensor.is_floating_point() or tensor.dtype == self.target:
            return 0.0
        norm = G.fnorm(tensor)
        if norm == 0.0:
            return 0.0
        fi = torch.finfo(self.target)
        u, eta = fi.eps / 2, fi.smallest_normal * fi.eps / 2
        # a second rounding happens when decoding into an output dtype narrower than the target
        u_out, eta_out = G.unit_roundoff(tensor.dtype) if torch.finfo(tensor.dtype).bits < 32 else (0.0, 0.0)
        rel = u + math.sqrt(tensor.numel()) * eta / norm
        return rel + u_out * (1 + rel) + math.sqrt(tensor.numel()) * eta_out / norm + 1e-7


@register_codec("fp16")
class Fp16Codec(CastCodec):
    """Cast to float16 (11-bit significand, max 65504)."""

    target = torch.float16


@register_codec("bf16")
class Bf16Codec(CastCodec):
    """Cast to bfloat16 (8-bit significand, float32 range)."""

    target = torch.bfloat16
