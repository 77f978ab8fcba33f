"""Truncated SVD keeping the smallest rank whose relative Frobenius error is within ``max_error``.

The tensor is read as a matrix ``[prod(shape[:-1]), shape[-1]]`` (a 0-d/1-d tensor as one row). Stored:
float32 factors ``A = U_r * S_r`` ``[m, r]`` and ``B = Vh_r`` ``[r, n]``, so it only pays off when the
rank is well below ``m * n / (2 * (m + n))`` (against bf16). SVD is computed in float32 on the tensor's
device; cost grows as ``m * n * min(m, n)``.
"""

from __future__ import annotations

from typing import Any

import torch

from qwen3vl_ray.codecs import groups as G
from qwen3vl_ray.codecs.base import Codec, IdentityCodec, dtype_from_name, dtype_name, pack_payload, register_codec
from qwen3vl_ray.errors import CodecError

#: float32 SVD and the A @ B product are accurate to about this, relative to ||x||
_SVD_SLACK = 2e-5


@register_codec("lowrank")
class LowRankCodec(Codec):
    """Truncated SVD; param ``max_error`` (relative Frobenius, 0 < max_error < 1, default 0.01)."""

    def __init__(self, max_error: float = 0.01):
        if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not 0 < max_error < 1:
            raise CodecError(f"codec 'lowrank': max_error must be a number in (0, 1), got {max_error!r}")
        self.max_error = float(max_error)

    def spec(self) -> str:
        return f"lowrank:max_error={self.max_error:g}"

    @staticmethod
    def _matrix(tensor: torch.Tensor) -> torch.Tensor:
        n = tensor.shape[-1] if tensor.dim() else 1
        return tensor.detach().reshape(-1, n).to(torch.float32)

    def encode(self, tensor: torch.Tensor) -> bytearray:
        if not tensor.is_floating_point():
            return IdentityCodec().encode(tensor)
        mat = self._matrix(tensor)
        if not bool(torch.isfinite(mat).all()):
            raise CodecError("codec 'lowrank' cannot encode NaN or inf values; use 'none' or 'bf16'")
        m, n = mat.shape
        if mat.numel() == 0:
            a, b = mat.new_empty((m, 0)), mat.new_empty((0, n))
        else:
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            s64 = s.to(torch.float64)
            # tail[r] = energy dropped when keeping r singular values
            tail = torch.flip(torch.cumsum(torch.flip(s64 * s64, [0]), 0), [0])
            tail = torch.cat([tail, tail.new_zeros(1)])
            total = float(tail[0])
            target = (self.max_error ** 2) * total
            r = int(torch.nonzero(tail <= target)[0]) if total > 0 else 0
            a, b = u[:, :r] * s[:r], vh[:r]
        meta = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "m": m, "n": n, "rank": int(a.shape[1])}
        return pack_payload(self.name, self.version, meta, [G.host_bytes(a.contiguous()), G.host_bytes(b.contiguous())])

    def decode_parts(self, meta: dict[str, Any], buffers, device) -> torch.Tensor:
        m, n, r = int(meta["m"]), int(meta["n"]), int(meta["rank"])
        a = G.buffer_tensor(buffers[0], torch.float32, [m, r])
        b = G.buffer_tensor(buffers[1], torch.float32, [r, n])
        if device is not None:
            a, b = a.to(device), b.to(device)
        return (a @ b).reshape(meta["shape"]).to(dtype_from_name(meta["dtype"]))

    def error_bound(self, tensor: torch.Tensor) -> float:
        if not tensor.is_floating_point():
            return 0.0
        norm = G.fnorm(tensor)
        return G.finish_bound((self.max_error + _SVD_SLACK) * norm, norm, tensor.numel(), tensor.dtype)
