"""KV-cache layout quantizers ``kv-int8`` / ``kv-int4`` (KIVI-style).

Expected layout: ``[..., 2, kv_heads, tokens, head_dim]`` where index 0 of the ``2`` axis is keys and 1 is
values -- the engine's KV chunk ``[layers, 2, kv_heads, tokens, head_dim]`` fits as is. Keys have a few
outlier channels, so they are quantized per channel (groups of ``group`` tokens along the tokens axis,
one scale per (head, channel, token group)); values are quantized per token (groups of ``group`` along
head_dim). The ``residual`` most recent tokens are kept in the original dtype (default 0: a stored chunk
is complete, so a full-precision window only helps the still-growing tail of a sequence).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qwen3vl_ray.codecs import blocked as B
from qwen3vl_ray.codecs import fused as F
from qwen3vl_ray.codecs import gpu_fused as GF
from qwen3vl_ray.codecs import groups as G
from qwen3vl_ray.codecs.base import (
    _VIEW_AS, Codec, PayloadLayout, PayloadWriter, SegmentDigests, check_digest, dtype_from_name, dtype_name,
    pack_payload, payload_header, register_codec, tensor_bytes,
)
from qwen3vl_ray.errors import CodecError

_KEY_AXIS, _VALUE_AXIS = -2, -1  # in the [..., heads, tokens, head_dim] view of one of k / v
#: the fused encode's plan per (codec, group, shape, dtype, cut): see KVQuantCodec._plan
_LAYOUTS: dict[tuple, F.EncodePlan] = {}
#: the fused decode's plan per payload layout (bits, shape, cut, recorded groups, buffer lengths), checked once
_DECODE_PLANS: dict[tuple, F.DecodePlan] = {}


class KVQuantCodec(Codec):
    bits = 8

    def __init__(self, group: int = 128, residual: int = 0):
        if not isinstance(group, int) or isinstance(group, bool) or not 1 <= group <= 1 << 20:
            raise CodecError(f"codec {self.name!r}: group must be an integer in 1..{1 << 20}, got {group!r}")
        if not isinstance(residual, int) or isinstance(residual, bool) or residual < 0:
            raise CodecError(f"codec {self.name!r}: residual must be an integer >= 0 (tokens kept full precision), got {residual!r}")
        self.group, self.residual = group, residual
        self.qmax = 127 if self.bits == 8 else 7

    def spec(self) -> str:
        return f"{self.name}:group={self.group},residual={self.residual}"

    def _split(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        if tensor.dim() < 4 or tensor.shape[-4] != 2:
            raise CodecError(f"codec {self.name!r} expects a KV tensor [..., 2(k/v), kv_heads, tokens, head_dim], got shape {tuple(tensor.shape)}; use 'int8'/'int4' for other tensors")
        if not tensor.is_floating_point():
            raise CodecError(f"codec {self.name!r} needs a floating-point tensor, got {tensor.dtype}")
        t = tensor.detach()
        tokens = t.shape[-2]
        cut = tokens - min(self.residual, tokens)
        head = t[..., :cut, :]
        rest = t[..., cut:, :] if cut < tokens else None
        return head.select(-4, 0), head.select(-4, 1), rest, cut

    def _quant(self, part: torch.Tensor, axis: int) -> tuple[G.Grouping, torch.Tensor, torch.Tensor, torch.Tensor]:
        g = G.grouping(part.shape, axis % part.dim(), self.group)
        xg = G.grouped_float(part, g)
        amax = G.group_amax(xg, self.name)
        return g, xg, amax, part

    def _fused_cut(self, tensor: torch.Tensor, available=F.available) -> int | None:
        """The cut (tokens quantized) when the fused kernels (``available``: the CPU's, or the GPU's
        ``gpu_fused.available``) take ``tensor``, else None -- from the shape alone: slicing views costs ~10 us,
        a few percent of a 2 MiB chunk's encode."""
        shape = tensor.shape
        if len(shape) < 4 or shape[-4] != 2 or not available(tensor) or not tensor.is_contiguous():
            return None
        cut = shape[-2] - min(self.residual, shape[-2])
        return cut if cut and tensor.numel() else None

    def _gpu_cut(self, tensor: torch.Tensor) -> int | None:
        """The cut when the Triton kernels take ``tensor`` (a CUDA KV chunk whose parts they support), else None."""
        cut = self._fused_cut(tensor, GF.available)
        if cut is None:
            return None
        parts = self._plan(tensor, cut).parts
        return cut if all(GF.supports(g, self.bits == 4) for g in parts) else None

    def encode(self, tensor: torch.Tensor) -> bytearray:
        cut = self._fused_cut(tensor)
        if cut is not None:
            return self._encode_fused(tensor, cut)[0]
        cut = self._gpu_cut(tensor)
        if cut is not None:
            return self._encode_gpu(tensor, cut)
        keys, values, rest, cut = self._split(tensor)
        if B.usable(tensor) and keys.numel():
            return self._encode_blocked(tensor, cut)
        meta: dict[str, Any] = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "cut": cut}
        bufs = []
        for tag, part, axis in (("k", keys, _KEY_AXIS), ("v", values, _VALUE_AXIS)):
            g, xg, amax, _ = self._quant(part, axis)
            q, scales = G.quantize_int(xg, amax, self.qmax)
            if self.bits == 4:
                q = G.pack_int4(q)
            meta[tag] = g.meta()
            bufs += [G.host_bytes(q), G.host_bytes(scales)]
        if rest is not None and not bool(torch.isfinite(rest).all()):
            raise CodecError(f"codec {self.name!r} cannot encode NaN or inf values; use 'none' or 'bf16'")
        bufs.append(tensor_bytes(rest) if rest is not None else b"")
        return pack_payload(self.name, self.version, meta, bufs)

    @staticmethod
    def _parts(t: torch.Tensor, cut: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of ``t`` [..., 2, H, T, D]: keys [A, H, cut, D], values [A, H, cut, D, 1], residual [A, 2, H, T-cut, D]."""
        t5 = t.view(-1, *t.shape[-4:])
        head = t5[:, :, :, :cut]
        return head[:, 0], head[:, 1].unsqueeze(-1), t5[:, :, :, cut:]

    def encode_measured(self, tensor: torch.Tensor) -> tuple[bytearray, float | None]:
        """The payload and its ``relative_error`` (rounded up by ~1e-6), summed by the fused kernels as they
        quantize (no decode); None where the fused path does not run."""
        cut = self._fused_cut(tensor)
        if cut is None:
            return self.encode(tensor), None
        payload, (e2, x2), rest2 = self._encode_fused(tensor, cut, measure=1)
        return payload, F.error_bound(e2, x2 + rest2, tensor.numel(), tensor.dtype)

    def encode_bounded(self, tensor: torch.Tensor, bound: str = "full") -> tuple[bytearray, float | None]:
        """The payload and an upper bound of its ``relative_error`` (:func:`fused.bound_error`) from sums the
        kernels take as they quantize, at a fraction of :meth:`encode_measured`'s cost; None where the fused
        path does not run. ``bound``: as in ``quant.GroupQuantCodec.encode_bounded``."""
        measure = F.bound_measure(bound, self.name)
        cut = self._fused_cut(tensor)
        if cut is None:
            return self.encode(tensor), None
        payload, sums, rest2 = self._encode_fused(tensor, cut, measure=measure)
        return payload, F.bound_error(sums, tensor.numel(), tensor.dtype, rest2, exact_steps=bound == "steps")

    def _encode_fused(self, t: torch.Tensor, cut: int, measure: int = 0) -> tuple[bytearray, tuple[float, ...], float]:
        """CPU fast path: one numba pass per part straight into the payload (same bytes as the other paths);
        with ``measure``, also the kernels' sums (:func:`fused.quantize_parts`) and the squared norm of the residual
        window (stored exactly)."""
        t = t.detach()
        plan = self._plan(t, cut)
        w = PayloadWriter.of(plan.layout)
        sums = F.quantize_parts(F.as_bits(t), plan, self.qmax, w, self.name, measure)
        rest2 = 0.0
        if cut < t.shape[-2]:
            rest = self._parts(t, cut)[2]
            self._write_rest(w, rest)
            rest2 = float(torch.linalg.vector_norm(rest.double())) ** 2 if measure else 0.0
        return w.finish(), sums, rest2

    def _encode_gpu(self, t: torch.Tensor, cut: int) -> bytearray:
        """GPU path: the Triton kernels quantize keys and values in device memory; only codes, scales and the
        residual window cross to the host (same bytes as the other paths)."""
        t = t.detach()
        plan = self._plan(t, cut)
        w = PayloadWriter.of(plan.layout)
        GF.quantize_parts(t, plan.parts, self.qmax, self.bits == 4, w, self.name)
        if cut < t.shape[-2]:
            self._write_rest(w, self._parts(t, cut)[2])
        return w.finish()

    def _plan(self, t: torch.Tensor, cut: int) -> F.EncodePlan:
        """The fused encode's plan of ``t``'s shape and dtype (parts, payload layout, launches), kept per layout
        (:data:`_LAYOUTS`): entries of one kind repeat it, and building it costs ~35 us, ~20% of a 2 MiB chunk's
        encode."""
        key = (self.name, self.version, self.group, tuple(t.shape), t.dtype, cut)
        got = _LAYOUTS.get(key)
        if got is not None and got.fresh():
            return got
        parts = list(F.kv_parts(t.shape, cut, self.group))
        pack4 = self.bits == 4
        lengths = []
        for g in parts:
            count = g.U * g.H * g.T * -(-g.n // g.group) * g.group * g.post
            lengths += [(count + 1) // 2 if pack4 else count, 4 * count // g.group]
        lengths.append((t.shape[-2] - cut) * (t.numel() // t.shape[-2]) * t.element_size())
        head = list(t.shape[:-4]) + list(t.shape[-3:-2]) + [cut, t.shape[-1]]
        gk, gv = (G.grouping(head, axis % len(head), self.group) for axis in (_KEY_AXIS, _VALUE_AXIS))
        meta = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "cut": cut, "k": gk.meta(), "v": gv.meta()}
        layout = PayloadLayout(payload_header(self.name, self.version, meta, lengths), lengths)
        return F.remember(_LAYOUTS, key, F.EncodePlan(parts, pack4, layout))

    def _encode_blocked(self, tensor: torch.Tensor, cut: int) -> bytearray:
        """CPU fast path: cache-sized tiles quantized straight into the payload (same bytes as the plain path)."""
        t = tensor.detach().contiguous()
        keys, values, rest = self._parts(t, cut)
        part_shape = list(t.shape[:-4]) + list(t.shape[-3:-2]) + [cut, t.shape[-1]]
        gs = {tag: G.grouping(part_shape, axis % len(part_shape), self.group) for tag, axis in (("k", _KEY_AXIS), ("v", _VALUE_AXIS))}
        pack4 = self.bits == 4
        lengths = []
        for g in gs.values():
            count = g.pre * g.padded * g.post
            lengths += [(count + 1) // 2 if pack4 else count, 4 * g.pre * g.ngroups * g.post]
        lengths.append(rest.numel() * t.element_size())
        meta = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "cut": cut, "k": gs["k"].meta(), "v": gs["v"].meta()}
        w = PayloadWriter(self.name, self.version, meta, lengths)
        for i, (g, part) in enumerate(((gs["k"], keys), (gs["v"], values))):
            codes = B.payload_tensor(w.buffers[2 * i], torch.uint8 if pack4 else torch.int8)
            scales = B.payload_tensor(w.buffers[2 * i + 1], torch.float32).view(g.pre, g.ngroups, g.post)
            B.quantize(part, g, self.qmax, pack4, codes, scales, self.name)
            del codes, scales
        self._write_rest(w, rest)
        return w.finish()

    def _write_rest(self, w: PayloadWriter, rest: torch.Tensor) -> None:
        """The full-precision window (the last tokens, kept raw) into the payload's fifth buffer, hashed."""
        if not rest.numel():
            return
        if not bool(torch.isfinite(rest).all()):
            raise CodecError(f"codec {self.name!r} cannot encode NaN or inf values; use 'none' or 'bf16'")
        dst = B.payload_tensor(w.buffers[4], _VIEW_AS.get(rest.dtype, rest.dtype)).view(rest.dtype).view(rest.shape)
        dst.copy_(rest)

    checks_digest = True

    def decode_checked(self, meta: dict[str, Any], buffers, device, out: torch.Tensor | None, check) -> torch.Tensor:
        """The fused decode hashes the codes as it reads them, then the digest is checked (see Codec)."""
        cut = int(meta["cut"])
        dtype = dtype_from_name(meta["dtype"])
        shape = list(meta["shape"])
        if out is not None:
            fused = F.available(out) and out.is_contiguous() and cut and out.dim() >= 4 and out.numel()
        else:
            on_cpu = device is None or torch.device(device).type == "cpu"
            fused = on_cpu and cut and len(shape) >= 4 and all(shape) and F.available(torch.empty(0, dtype=dtype))
        if not fused:
            return super().decode_checked(meta, buffers, device, out, check)
        return self._decode_fused(meta, buffers, dtype, shape if out is None else list(out.shape), cut, out, check)

    def decode_into(self, meta: dict[str, Any], buffers, out: torch.Tensor) -> None:
        cut = int(meta["cut"])
        if F.available(out) and out.is_contiguous() and cut and out.dim() >= 4 and out.numel():
            self._decode_fused(meta, buffers, out.dtype, list(out.shape), cut, out)
        else:
            out.copy_(self.decode_parts(meta, buffers, out.device))

    def _decode_fused(self, meta: dict[str, Any], buffers, dtype: torch.dtype, shape: list[int], cut: int,
                      out: torch.Tensor | None = None, check=None) -> torch.Tensor:
        """The fused decode; with ``check`` (see :func:`base.check_digest`), the kernels hash the codes as they read
        them and the payload's digest is checked after."""
        plan = self._decode_plan(meta, buffers, shape, cut)
        digests = None if check is None else SegmentDigests(plan.digest_spans, plan.nseg)
        out = B.empty(shape, dtype) if out is None else out
        F.dequantize_parts(F.as_bits(out), plan, buffers, digests)
        out = self._read_rest(out, buffers, cut)
        if check is not None:
            check_digest(check, buffers, digests)
        return out

    def _decode_plan(self, meta: dict[str, Any], buffers, shape: list[int], cut: int) -> F.DecodePlan:
        """The keys' and values' decode plan of a payload, from the groups it recorded (decode builds this codec with
        default parameters), checked against its shape and buffer lengths once per layout (:data:`_DECODE_PLANS`)."""
        if len(buffers) != 5 or shape[-4] != 2 or not 0 < cut <= shape[-2]:
            raise CodecError(f"corrupt {self.name!r} payload: shape {shape}, cut {cut}, {len(buffers)} buffers")
        lengths = tuple(len(b) for b in buffers)
        # TypeError (corrupt) where a recorded group is not flat
        key = (self.bits, tuple(shape), cut, tuple(meta["k"]), tuple(meta["v"]), lengths)
        plan = _DECODE_PLANS.get(key)
        if plan is None or not plan.fresh():
            parts = list(F.kv_parts(shape, cut, int(meta["k"][3]), int(meta["v"][3])))
            for tag, g in zip(("k", "v"), parts):
                if G.Grouping.from_meta(meta[tag]).meta() != [g.U * g.H * g.T, g.n, g.post, g.group]:
                    raise CodecError(f"corrupt {self.name!r} payload: {tag} groups {meta[tag]} do not fit shape {shape}")
            plan = F.remember(_DECODE_PLANS, key, F.DecodePlan(parts, self.bits == 4, lengths, self.name))
        return plan

    def _decode_gpu(self, meta: dict[str, Any], buffers, dtype: torch.dtype, shape: list[int], cut: int,
                    device) -> torch.Tensor | None:
        """GPU path: codes and scales go up in one copy, the Triton kernels dequantize them there; None where
        the kernels do not take the payload's parts."""
        parts = self._decode_plan(meta, buffers, shape, cut).parts
        if not all(GF.supports(g, self.bits == 4) for g in parts):
            return None
        out = torch.empty(shape, dtype=dtype, device=device)
        GF.dequantize_parts(out, parts, self.bits == 4, buffers, self.name)
        return self._read_rest(out, buffers, cut)

    def _read_rest(self, out: torch.Tensor, buffers, cut: int) -> torch.Tensor:
        """The full-precision window (the payload's fifth buffer) into ``out``'s last tokens; returns ``out``."""
        if cut < out.shape[-2]:
            rest = self._parts(out, cut)[2]
            rest.copy_(G.buffer_tensor(buffers[4], out.dtype, list(rest.shape)))
        return out

    def _decode_blocked(self, meta: dict[str, Any], buffers, dtype: torch.dtype, shape: list[int], cut: int) -> torch.Tensor:
        pack4 = self.bits == 4
        out = B.empty(shape, dtype)
        keys, values, _ = self._parts(out, cut)
        for i, (tag, part) in enumerate((("k", keys), ("v", values))):
            g = G.Grouping.from_meta(meta[tag])
            count = g.pre * g.padded * g.post
            need = ((count + 1) // 2 if pack4 else count, 4 * g.pre * g.ngroups * g.post)
            got = (memoryview(buffers[2 * i]).nbytes, memoryview(buffers[2 * i + 1]).nbytes)
            if got != need or g.pre * g.n * g.post != part.numel():
                raise CodecError(f"corrupt {self.name!r} payload: {tag} buffers of {list(got)} bytes, groups {g.meta()} need {list(need)}")
            codes = B.payload_tensor(buffers[2 * i], torch.uint8 if pack4 else torch.int8)
            scales = B.payload_tensor(buffers[2 * i + 1], torch.float32).view(g.pre, g.ngroups, g.post)
            B.dequantize(part, g, pack4, codes, scales)
        return self._read_rest(out, buffers, cut)

    def decode_parts(self, meta: dict[str, Any], buffers, device) -> torch.Tensor:
        dtype = dtype_from_name(meta["dtype"])
        shape = list(meta["shape"])
        cut = int(meta["cut"])
        on_cpu = device is None or torch.device(device).type == "cpu"
        if on_cpu and cut and len(shape) >= 4 and all(shape) and F.available(torch.empty(0, dtype=dtype)):
            return self._decode_fused(meta, buffers, dtype, shape, cut)
        if cut and len(shape) >= 4 and all(shape) and GF.available(device=device or "cpu", dtype=dtype):
            out = self._decode_gpu(meta, buffers, dtype, shape, cut, device or "cpu")
            if out is not None:
                return out
        if on_cpu and cut and len(shape) >= 4 and all(shape) and B.usable(torch.empty(0)):
            return self._decode_blocked(meta, buffers, dtype, shape, cut)
        out = torch.empty(shape, dtype=dtype, device=device or "cpu")
        head_shape = shape[:-2] + [cut, shape[-1]]
        part_shape = head_shape[:-4] + head_shape[-3:]
        for i, tag in enumerate(("k", "v")):
            g = G.Grouping.from_meta(meta[tag])
            count = g.pre * g.padded * g.post
            scales = G.buffer_tensor(buffers[2 * i + 1], torch.float32, [g.pre, g.ngroups, g.post]).to(out.device)
            if self.bits == 4:
                packed = G.buffer_tensor(buffers[2 * i], torch.uint8, [(count + 1) // 2]).to(out.device)
                q = G.unpack_int4(packed, count)
            else:
                q = G.buffer_tensor(buffers[2 * i], torch.int8, [count]).to(out.device)
            out[..., :cut, :].select(-4, i).copy_(G.dequantize(q, scales, g, part_shape, dtype))
        if cut < shape[-2]:
            rest_shape = shape[:-2] + [shape[-2] - cut, shape[-1]]
            out[..., cut:, :].copy_(G.buffer_tensor(buffers[4], dtype, rest_shape))
        return out

    def error_bound(self, tensor: torch.Tensor) -> float:
        keys, values, _, _ = self._split(tensor)
        err_sq = 0.0
        for part, axis in ((keys, _KEY_AXIS), (values, _VALUE_AXIS)):
            g, _, amax, _ = self._quant(part, axis)
            err_sq += G.int_err_sq(amax, g, self.qmax)
        return G.finish_bound(math.sqrt(err_sq), G.fnorm(tensor), tensor.numel(), tensor.dtype)


@register_codec("kv-int8")
class KVInt8Codec(KVQuantCodec):
    """KV layout int8: keys per channel, values per token, optional full-precision recent window."""

    bits = 8


@register_codec("kv-int4")
class KVInt4Codec(KVQuantCodec):
    """KV layout int4 (two codes per byte): keys per channel, values per token, optional residual window."""

    bits = 4
