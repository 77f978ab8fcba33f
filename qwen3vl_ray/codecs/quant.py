"""Group-wise symmetric quantizers: int8, int4 (two codes per byte) and fp8 e4m3, with float32 scales.

Params: ``group`` (elements per scale along ``axis``, default 128) and ``axis`` (default -1, the last
dimension). Footprint per element: int8 1 + 4/group bytes, int4 0.5 + 4/group, fp8 1 + 4/group; at the
default group of 128 that is 1.94x / 3.76x / 1.94x smaller than bf16. NaN/inf inputs raise CodecError.
"""

from __future__ import annotations

from typing import Any

import torch

from qwen3vl_ray.codecs import blocked as B
from qwen3vl_ray.codecs import fused as F
from qwen3vl_ray.codecs import gpu_fused as GF
from qwen3vl_ray.codecs import groups as G
from qwen3vl_ray.codecs.base import (
    Codec, IdentityCodec, PayloadLayout, PayloadWriter, SegmentDigests, check_digest, dtype_from_name, dtype_name,
    pack_payload, payload_header, register_codec,
)
from qwen3vl_ray.errors import CodecError

#: the fused encode's plan per (codec, group, axis, shape, dtype)
_LAYOUTS: dict[tuple, F.EncodePlan] = {}
#: the fused decode's plan per (kind, groups, buffer lengths), the lengths checked once
_DECODE_PLANS: dict[tuple, F.DecodePlan] = {}


def _part(g: G.Grouping) -> F.Geometry:
    """The kernels' geometry of a plain grouping (one part: the whole tensor)."""
    return F.Geometry.plain(g.pre, g.n, g.post, g.group)


class GroupQuantCodec(Codec):
    """Shared encode/decode for the three group-wise quantizers (subclasses set ``kind``)."""

    kind = "int8"  # "int8" | "int4" | "fp8"
    qmax = 127

    def __init__(self, group: int = 128, axis: int = -1):
        if not isinstance(group, int) or isinstance(group, bool) or not 1 <= group <= 1 << 20:
            raise CodecError(f"codec {self.name!r}: group must be an integer in 1..{1 << 20}, got {group!r}")
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise CodecError(f"codec {self.name!r}: axis must be an integer dimension, got {axis!r}")
        self.group, self.axis = group, axis

    def spec(self) -> str:
        return f"{self.name}:group={self.group},axis={self.axis}"

    def _prepare(self, tensor: torch.Tensor) -> tuple[G.Grouping, torch.Tensor, torch.Tensor]:
        axis = G.normalize_axis(self.axis, tensor.dim(), self.name)
        g = G.grouping(tensor.shape, axis, self.group)
        xg = G.grouped_float(tensor.detach(), g)
        return g, xg, G.group_amax(xg, self.name)

    def encode(self, tensor: torch.Tensor) -> bytearray:
        if not tensor.is_floating_point():
            # integer/bool tensors (token ids, masks) are stored exactly; the payload says "none"
            return IdentityCodec().encode(tensor)
        if self._fused(tensor):
            return self._encode_fused(tensor)[0]
        if self._gpu(tensor):
            return self._encode_gpu(tensor)
        if self.kind != "fp8" and B.usable(tensor) and tensor.numel():
            return self._encode_blocked(tensor)
        g, xg, amax = self._prepare(tensor)
        if self.kind == "fp8":
            q, scales = G.quantize_fp8(xg, amax)
        else:
            q, scales = G.quantize_int(xg, amax, self.qmax)
            if self.kind == "int4":
                q = G.pack_int4(q)
        meta = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "groups": g.meta()}
        return pack_payload(self.name, self.version, meta, [G.host_bytes(q), G.host_bytes(scales)])

    def _layout(self, tensor: torch.Tensor) -> tuple[G.Grouping, dict[str, Any], list[int]]:
        g = self._grouping(tensor)
        count = g.pre * g.padded * g.post
        meta = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "groups": g.meta()}
        return g, meta, [(count + 1) // 2 if self.kind == "int4" else count, 4 * g.pre * g.ngroups * g.post]

    def _fused(self, tensor: torch.Tensor) -> bool:
        return self.kind != "fp8" and F.available(tensor) and tensor.numel() > 0 and tensor.is_contiguous()

    def _gpu(self, tensor: torch.Tensor) -> bool:
        if self.kind == "fp8" or not GF.available(tensor) or not tensor.numel() or not tensor.is_contiguous():
            return False
        return GF.supports(_part(self._grouping(tensor)), self.kind == "int4")

    def _grouping(self, tensor: torch.Tensor) -> G.Grouping:
        return G.grouping(tensor.shape, G.normalize_axis(self.axis, tensor.dim(), self.name), self.group)

    def _encode_gpu(self, tensor: torch.Tensor) -> bytearray:
        """GPU path: the Triton kernels quantize in device memory and only codes and scales cross to the host
        (same bytes as the other paths)."""
        g, meta, lengths = self._layout(tensor)
        w = PayloadWriter(self.name, self.version, meta, lengths)
        part = _part(g)
        GF.quantize_parts(tensor, [part], self.qmax, self.kind == "int4", w, self.name)
        return w.finish()

    def encode_measured(self, tensor: torch.Tensor) -> tuple[bytearray, float | None]:
        """The payload and its ``relative_error`` (rounded up by ~1e-6), summed by the fused kernel as it
        quantizes (no decode); None where the fused path does not run."""
        if not self._fused(tensor):
            return self.encode(tensor), None
        payload, sums = self._encode_fused(tensor, measure=1)
        return payload, F.error_bound(*sums, tensor.numel(), tensor.dtype)

    def encode_bounded(self, tensor: torch.Tensor, bound: str = "full") -> tuple[bytearray, float | None]:
        """The payload and an upper bound of its ``relative_error`` (:func:`fused.bound_error`: ~1.7x the error
        plus ~0.4% for bf16) from sums the kernel takes as it quantizes, at a fraction of
        :meth:`encode_measured`'s cost; None where the fused path does not run. ``bound`` (:data:`fused.BOUNDS`):
        ``full``; ``cheap``, the norm's lower bound from the squares of the largest of each two or four inputs
        (``fused_kernels.ENCODE``): a third to a half of the extra cost, the bound ~1.0-1.3x looser; ``amax``,
        per channel the cheap bound, in a row's group its largest input alone (from its scale): cheaper still,
        and far looser on row groups; ``steps``, the codes' rounding steps summed exactly: the tightest (1.1-1.8x
        the error on bf16), the dearest."""
        measure = F.bound_measure(bound, self.name)
        if not self._fused(tensor):
            return self.encode(tensor), None
        payload, sums = self._encode_fused(tensor, measure=measure)
        return payload, F.bound_error(sums, tensor.numel(), tensor.dtype, exact_steps=bound == "steps")

    def _encode_fused(self, tensor: torch.Tensor, measure: int = 0) -> tuple[bytearray, tuple[float, ...]]:
        """CPU fast path: one numba pass straight into the payload (same bytes as the other paths)."""
        key = (self.name, self.version, self.group, self.axis, tuple(tensor.shape), tensor.dtype)
        plan = _LAYOUTS.get(key)
        if plan is None or not plan.fresh():  # once per layout: ~35 us, ~25% of a 2 MiB tensor's encode
            g, meta, lengths = self._layout(tensor)
            layout = PayloadLayout(payload_header(self.name, self.version, meta, lengths), lengths)
            plan = F.remember(_LAYOUTS, key, F.EncodePlan([_part(g)], self.kind == "int4", layout))
        w = PayloadWriter.of(plan.layout)
        sums = F.quantize_parts(F.as_bits(tensor.detach()), plan, self.qmax, w, self.name, measure)
        return w.finish(), sums

    def _encode_blocked(self, tensor: torch.Tensor) -> bytearray:
        """CPU fast path: cache-sized tiles quantized straight into the payload (same bytes as the plain path)."""
        g = self._grouping(tensor)
        count = g.pre * g.padded * g.post
        pack4 = self.kind == "int4"
        meta = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "groups": g.meta()}
        w = PayloadWriter(self.name, self.version, meta, [(count + 1) // 2 if pack4 else count, 4 * g.pre * g.ngroups * g.post])
        codes = B.payload_tensor(w.buffers[0], torch.uint8 if pack4 else torch.int8)
        scales = B.payload_tensor(w.buffers[1], torch.float32).view(g.pre, g.ngroups, g.post)
        B.quantize(tensor.detach().reshape(g.pre, g.n, g.post), g, self.qmax, pack4, codes, scales, self.name)
        del codes, scales
        return w.finish()

    def decode_parts(self, meta: dict[str, Any], buffers, device) -> torch.Tensor:
        g = G.Grouping.from_meta(meta["groups"])
        count = g.pre * g.padded * g.post
        on_cpu = device is None or torch.device(device).type == "cpu"
        dtype = dtype_from_name(meta["dtype"])
        if self.kind != "fp8" and on_cpu and count and F.available(torch.empty(0, dtype=dtype)):
            return self._decode_fused(meta, g, dtype, buffers)
        if self.kind != "fp8" and count and GF.available(device=device or "cpu", dtype=dtype):
            part = _part(g)
            if GF.supports(part, self.kind == "int4"):
                return self._decode_gpu(meta, part, dtype, buffers, device or "cpu")
        if self.kind != "fp8" and on_cpu and count and B.usable(torch.empty(0)):
            return self._decode_blocked(meta, g, count, buffers)
        scales = G.buffer_tensor(buffers[1], torch.float32, [g.pre, g.ngroups, g.post])
        if self.kind == "int4":
            q = G.buffer_tensor(buffers[0], torch.uint8, [(count + 1) // 2])
        else:
            q = G.buffer_tensor(buffers[0], torch.float8_e4m3fn if self.kind == "fp8" else torch.int8, [count])
        if device is not None:
            q, scales = q.to(device), scales.to(device)
        if self.kind == "int4":
            q = G.unpack_int4(q, count)
        return G.dequantize(q, scales, g, meta["shape"], dtype_from_name(meta["dtype"]))

    @property
    def checks_digest(self) -> bool:
        return self.kind != "fp8"

    def decode_checked(self, meta: dict[str, Any], buffers, device, out: torch.Tensor | None, check) -> torch.Tensor:
        """The fused decode hashes the codes as it reads them, then the digest is checked (see Codec)."""
        g = G.Grouping.from_meta(meta["groups"])
        dtype = dtype_from_name(meta["dtype"])
        if out is not None:
            fused = F.available(out) and out.is_contiguous() and out.numel() > 0
        else:
            on_cpu = device is None or torch.device(device).type == "cpu"
            fused = on_cpu and g.pre * g.padded * g.post > 0 and F.available(torch.empty(0, dtype=dtype))
        if not fused:
            return super().decode_checked(meta, buffers, device, out, check)
        return self._decode_fused(meta, g, dtype, buffers, out, check)

    def decode_into(self, meta: dict[str, Any], buffers, out: torch.Tensor) -> None:
        g = G.Grouping.from_meta(meta["groups"])
        if self.kind != "fp8" and F.available(out) and out.is_contiguous() and out.numel():
            self._decode_fused(meta, g, out.dtype, buffers, out)
        else:
            out.copy_(self.decode_parts(meta, buffers, out.device))

    def _decode_fused(self, meta: dict[str, Any], g: G.Grouping, dtype: torch.dtype, buffers,
                      out: torch.Tensor | None = None, check=None) -> torch.Tensor:
        """The fused decode; with ``check`` (see :func:`base.check_digest`), the kernel hashes the codes as it reads
        them and the payload's digest is checked after."""
        if len(buffers) != 2:
            raise CodecError(f"corrupt {self.name!r} payload: {len(buffers)} buffers, layout needs 2")
        out = B.empty(meta["shape"], dtype) if out is None else out
        if out.numel() != g.pre * g.n * g.post:
            raise CodecError(f"corrupt {self.name!r} payload: shape {meta['shape']} does not match groups {g.meta()}")
        lengths = tuple(len(b) for b in buffers)
        key = (self.kind, g.pre, g.n, g.post, g.group, lengths)
        plan = _DECODE_PLANS.get(key)
        if plan is None or not plan.fresh():
            plan = F.remember(_DECODE_PLANS, key, F.DecodePlan([_part(g)], self.kind == "int4", lengths, self.name))
        digests = None if check is None else SegmentDigests(plan.digest_spans, plan.nseg)
        F.dequantize_parts(F.as_bits(out), plan, buffers, digests)
        if check is not None:
            check_digest(check, buffers, digests)
        return out

    def _decode_gpu(self, meta: dict[str, Any], part: F.Geometry, dtype: torch.dtype, buffers, device) -> torch.Tensor:
        """GPU path: the payload's codes and scales go up in one copy and the Triton kernels dequantize there."""
        if len(buffers) != 2:
            raise CodecError(f"corrupt {self.name!r} payload: {len(buffers)} buffers, layout needs 2")
        out = torch.empty(meta["shape"], dtype=dtype, device=device)
        if out.numel() != part.T * part.n * part.post:
            raise CodecError(f"corrupt {self.name!r} payload: shape {meta['shape']} does not match its groups")
        GF.dequantize_parts(out, [part], self.kind == "int4", buffers, self.name)
        return out

    def _decode_blocked(self, meta: dict[str, Any], g: G.Grouping, count: int, buffers) -> torch.Tensor:
        pack4 = self.kind == "int4"
        need = ((count + 1) // 2 if pack4 else count, 4 * g.pre * g.ngroups * g.post)
        if tuple(memoryview(b).nbytes for b in buffers[:2]) != need or len(buffers) != 2:
            raise CodecError(f"corrupt {self.name!r} payload: buffers of {[memoryview(b).nbytes for b in buffers]} bytes, layout needs {list(need)}")
        codes = B.payload_tensor(buffers[0], torch.uint8 if pack4 else torch.int8)
        scales = B.payload_tensor(buffers[1], torch.float32).view(g.pre, g.ngroups, g.post)
        out = B.empty(meta["shape"], dtype_from_name(meta["dtype"]))
        if out.numel() != g.pre * g.n * g.post:
            raise CodecError(f"corrupt {self.name!r} payload: shape {meta['shape']} does not match groups {g.meta()}")
        B.dequantize(out.view(g.pre, g.n, g.post), g, pack4, codes, scales)
        return out

    def error_bound(self, tensor: torch.Tensor) -> float:
        if not tensor.is_floating_point():
            return 0.0
        g, xg, amax = self._prepare(tensor)
        norm = G.fnorm(tensor)
        if self.kind == "fp8":
            err = G.fp8_err(amax, g, norm)
        else:
            err = G.int_err_sq(amax, g, self.qmax) ** 0.5
        return G.finish_bound(err, norm, tensor.numel(), tensor.dtype)


@register_codec("int8")
class Int8Codec(GroupQuantCodec):
    """Symmetric int8, one float32 scale per ``group`` elements along ``axis``."""

    kind, qmax = "int8", 127


@register_codec("int4")
class Int4Codec(GroupQuantCodec):
    """Symmetric int4 in [-7, 7], packed two per byte, one float32 scale per ``group`` along ``axis``."""

    kind, qmax = "int4", 7


@register_codec("fp8")
class Fp8Codec(GroupQuantCodec):
    """float8 e4m3 (torch.float8_e4m3fn, max 448) with one float32 scale per ``group`` along ``axis``."""

    kind, qmax = "fp8", 448
