"""Group-wise symmetric quantization math shared by the int8, int4, fp8 and KV codecs.

A tensor is viewed as ``[pre, n, post]`` around the quantization ``axis`` (size ``n``); the axis is split
into groups of ``group`` consecutive elements (the last group zero-padded when ``n % group != 0``), giving
``[pre, G, group, post]``. Every group gets one float32 scale ``amax / qmax``; no transpose is needed for any
axis, so per-channel (axis = tokens) and per-token (axis = head_dim) layouts cost the same.

All math runs in float32 on the tensor's own device; only the small int/scale results move to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from qwen3vl_ray.errors import CodecError

#: groups whose max |x| is at or below this are stored as zeros (their inverse scale would overflow float32)
TINY = 1e-30
#: slack on the half-step rounding bound for float32 arithmetic in x * (qmax / amax)
_ROUND_SLACK = 1e-4
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(slots=True)
class Grouping:
    """How one tensor is cut into groups (recorded in the payload meta)."""

    pre: int
    n: int
    post: int
    group: int

    @property
    def padded(self) -> int:
        return -(-self.n // self.group) * self.group

    @property
    def ngroups(self) -> int:
        return self.padded // self.group

    def meta(self) -> list[int]:
        return [self.pre, self.n, self.post, self.group]

    @classmethod
    def from_meta(cls, m: list[int]) -> "Grouping":
        return cls(*(int(v) for v in m))


def check_float(tensor: torch.Tensor, codec: str) -> None:
    if not tensor.is_floating_point():
        raise CodecError(f"codec {codec!r} needs a floating-point tensor, got {tensor.dtype}; use 'none' or 'zstd'")


def normalize_axis(axis: int, ndim: int, codec: str) -> int:
    nd = max(ndim, 1)
    if not -nd <= axis < nd:
        raise CodecError(f"codec {codec!r}: axis {axis} out of range for a {ndim}-d tensor (allowed {-nd}..{nd - 1})")
    return axis % nd


def grouping(shape: torch.Size | tuple[int, ...], axis: int, group: int) -> Grouping:
    shape = tuple(shape) or (1,)
    pre = math.prod(shape[:axis])
    n = shape[axis]
    post = math.prod(shape[axis + 1:])
    return Grouping(pre, n, post, max(1, min(group, n)))


def grouped_float(x: torch.Tensor, g: Grouping) -> torch.Tensor:
    """``x`` as float32 ``[pre, G, group, post]`` (a fresh tensor: callers may modify it in place)."""
    xf = x.reshape(g.pre, g.n, g.post)
    if g.padded != g.n:
        out = torch.zeros((g.pre, g.padded, g.post), dtype=torch.float32, device=x.device)
        out[:, : g.n].copy_(xf)
    else:
        # x.float() aliases a float32 input; copy so the in-place quantization never touches the caller's data
        out = xf.to(torch.float32, copy=True)
    return out.view(g.pre, g.ngroups, g.group, g.post)


def group_amax(xg: torch.Tensor, codec: str) -> torch.Tensor:
    """Per-group max |x| as ``[pre, G, 1, post]``; refuses NaN/inf (a scale cannot represent them)."""
    amax = torch.maximum(xg.amax(2, keepdim=True), xg.amin(2, keepdim=True).neg_())
    if not bool(torch.isfinite(amax).all()):
        raise CodecError(f"codec {codec!r} cannot encode NaN or inf values; use 'none', 'bf16', 'fp16' or 'zstd'")
    return amax


def quantize_int(xg: torch.Tensor, amax: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``xg * qmax / amax`` in place; returns (int8 codes, float32 scales)."""
    big = amax > TINY
    inv = torch.where(big, qmax / torch.where(big, amax, 1.0), 0.0)
    xg.mul_(inv).round_()
    q = xg.to(torch.int8)
    return q, (amax / qmax).squeeze(2)


def quantize_fp8(xg: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    big = amax > TINY
    inv = torch.where(big, FP8_MAX / torch.where(big, amax, 1.0), 0.0)
    # clamp: float32 rounding can push amax * inv a hair over 448, which e4m3fn would turn into NaN
    xg.mul_(inv).clamp_(-FP8_MAX, FP8_MAX)
    return xg.to(torch.float8_e4m3fn), (amax / FP8_MAX).squeeze(2)


def dequantize(q: torch.Tensor, scales: torch.Tensor, g: Grouping, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Codes ``[pre, G, group, post]`` (any dtype) times scales ``[pre, G, post]`` back to ``shape``/``dtype``."""
    x = q.view(g.pre, g.ngroups, g.group, g.post).to(torch.float32).mul_(scales.unsqueeze(2))
    x = x.view(g.pre, g.padded, g.post)
    if g.padded != g.n:
        x = x[:, : g.n]
    return x.reshape(shape).to(dtype).contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-7, 7] -> uint8, two per byte (low nibble first), offset by 8 so 0 is never a code."""
    u = (q.reshape(-1) + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_full((1,), 8)])
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    both = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)[:count]
    return both.to(torch.int8) - 8


# ---- error bounds (float64 on the host; inputs are the per-group maxima) ---------------------------------

def unit_roundoff(dtype: torch.dtype) -> tuple[float, float]:
    """(relative, absolute) rounding error of storing a float32 result as ``dtype``.

    The absolute part is half the smallest subnormal; float64 outputs carry the float32 compute error.
    """
    if dtype in (torch.float32, torch.float64):
        return 2.0 ** -24, 0.0
    fi = torch.finfo(dtype)
    return fi.eps / 2, fi.smallest_normal * fi.eps / 2


def int_err_sq(amax: torch.Tensor, g: Grouping, qmax: int) -> float:
    """Squared Frobenius bound of integer quantization: half a step per element, or the whole value for TINY groups."""
    a = amax.detach().to("cpu", torch.float64)
    step = torch.where(a > TINY, a / qmax * (0.5 + _ROUND_SLACK), a)
    return float((step * step).sum()) * g.group


def fp8_err(amax: torch.Tensor, g: Grouping, norm: float) -> float:
    """Frobenius bound of scaled e4m3 rounding: 2^-4 relative for normals plus 2^-10 * scale absolute."""
    a = amax.detach().to("cpu", torch.float64)
    s = torch.where(a > TINY, a / FP8_MAX * 2.0 ** -10, a)
    return 2.0 ** -4 * (1 + _ROUND_SLACK) * norm + math.sqrt(float((s * s).sum()) * g.group)


def finish_bound(abs_err: float, norm: float, numel: int, dtype: torch.dtype) -> float:
    """Relative bound from an absolute quantization bound plus the final cast to ``dtype``."""
    if norm == 0.0:
        return 0.0
    u, eta = unit_roundoff(dtype)
    rel = abs_err / norm
    return rel + u * (1 + rel) + math.sqrt(numel) * eta / norm + 1e-7


def fnorm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.detach().to(torch.float64))) if x.numel() else 0.0


def host_bytes(t: torch.Tensor) -> np.ndarray:
    """A small result tensor's bytes on the host (one device->host copy for CUDA tensors)."""
    from qwen3vl_ray.codecs.base import tensor_bytes

    return tensor_bytes(t)


def buffer_tensor(buf, dtype: torch.dtype, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """A payload buffer as a CPU tensor: zero-copy over a writable payload, a copy over a read-only one."""
    from qwen3vl_ray.codecs.base import _VIEW_AS, tensor_from_bytes

    mv = memoryview(buf)
    if mv.readonly:
        return tensor_from_bytes(mv, dtype, shape)
    raw = torch.frombuffer(mv, dtype=torch.uint8) if mv.nbytes else torch.empty(0, dtype=torch.uint8)
    need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if raw.numel() != need:
        raise CodecError(f"payload holds {raw.numel()} bytes, {dtype} {tuple(shape)} needs {need}")
    return raw.view(_VIEW_AS.get(dtype, dtype)).view(dtype).reshape(shape)
