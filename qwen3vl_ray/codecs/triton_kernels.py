"""Triton kernels for group-wise int8 / int4 quantization on the GPU (the CUDA twins of :mod:`fused_kernels`).

One pass over the input per encode and one over the codes per decode, over the same ``Geometry`` parts as the
numba kernels (``U * H * T`` rows of ``n`` elements by ``post`` channels, groups of ``group`` along ``n``), with
the same float32 arithmetic in the same order, so payloads are byte-identical to the CPU paths:

- a group's maximum is taken on the input's bit pattern with the sign bit cleared (bf16 / fp16 / fp32 orders
  as its magnitude; NaN and inf come out as a non-finite scale, which the caller refuses);
- ``scale = amax / qmax`` and ``inv = (1 / amax) * qmax`` with IEEE division (``div_rn``: Triton's ``/`` is an
  approximate division on CUDA), ``inv = 0`` for a group at or below ``TINY``;
- a code is ``rint(x * inv)`` (round half to even, as ``torch.round``), by the float32 magic-number trick:
  ``(v + 1.5 * 2^23) - 1.5 * 2^23`` rounds ``|v| < 2^22`` to an integer exactly; the launchers turn off FMA
  contraction (``enable_fp_fusion=False``), which would round ``x * inv`` only once;
- decode writes ``code * scale`` in float32, rounded to nearest even into the output dtype.

``rows`` layouts (``post == 1``: groups along contiguous rows) take ``ITEMS`` groups per program; ``cols``
layouts (per-channel groups, the keys of a KV chunk) take one group per program and walk its rows in blocks
of ``RB``. int4 packs two codes per byte, low nibble first, ``code + 8``; the launchers use these kernels for
int4 only where pairs never straddle a group (even ``group`` for rows, even ``post`` for cols).

Compiled on first launch per specialization (Triton caches them on disk). In a process started with
``TRITON_INTERPRET=1`` (set before triton is imported: its own library functions are decorated then) they run
in Triton's interpreter on CPU tensors, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: 1.5 * 2^23: adding and subtracting it rounds a float32 of magnitude below 2^22 to the nearest even integer
MAGIC = tl.constexpr(12582912.0)


@triton.jit
def encode_rows(x_ptr, codes_ptr, scales_ptr, items, base, H, T, G, su, sh, st, n, group, qmax, tiny,
                BITS: tl.constexpr, PACK4: tl.constexpr, ITEMS: tl.constexpr, GP: tl.constexpr):
    """``ITEMS`` groups of a rows layout: codes at ``it * group`` (int4: ``it * group / 2`` bytes), scale at ``it``."""
    it = tl.program_id(0).to(tl.int64) * ITEMS + tl.arange(0, ITEMS).to(tl.int64)
    live = it < items
    src, m = _group_at(it, base, H, T, G, su, sh, st, n, group, 1)
    if PACK4:
        e = tl.arange(0, GP // 2)
        j = 2 * e
        ok0 = live[:, None] & (j[None, :] < m[:, None])
        ok1 = live[:, None] & ((j + 1)[None, :] < m[:, None])
        x0 = tl.load(x_ptr + src[:, None] + j[None, :], mask=ok0, other=0.0)
        x1 = tl.load(x_ptr + src[:, None] + (j + 1)[None, :], mask=ok1, other=0.0)
        amax = tl.maximum(_amax_bits(x0, BITS, 1), _amax_bits(x1, BITS, 1))
    else:
        j = tl.arange(0, GP)
        ok = live[:, None] & (j[None, :] < m[:, None])
        x0 = tl.load(x_ptr + src[:, None] + j[None, :], mask=ok, other=0.0)
        amax = _amax_bits(x0, BITS, 1)
    a = _from_bits(amax, BITS)
    tl.store(scales_ptr + it, tl.math.div_rn(a, qmax), mask=live)
    inv = _inv(a, qmax, tiny)
    if PACK4:
        n0 = _rint(x0.to(tl.float32) * inv[:, None]).to(tl.int32) + 8
        n1 = _rint(x1.to(tl.float32) * inv[:, None]).to(tl.int32) + 8
        byte = (n0 | (n1 << 4)).to(tl.uint8)
        keep = live[:, None] & (e[None, :] < group // 2)
        tl.store(codes_ptr + (it * (group // 2))[:, None] + e[None, :], byte, mask=keep)
    else:
        code = _rint(x0.to(tl.float32) * inv[:, None]).to(tl.int32).to(tl.int8)
        keep = live[:, None] & (j[None, :] < group)
        tl.store(codes_ptr + (it * group)[:, None] + j[None, :], code, mask=keep)


@triton.jit
def encode_cols(x_ptr, codes_ptr, scales_ptr, base, H, T, G, su, sh, st, n, post, group, qmax, tiny,
                BITS: tl.constexpr, PACK4: tl.constexpr, RB: tl.constexpr, PP: tl.constexpr):
    """One group of a cols layout (``group`` rows by ``post`` channels, a scale per channel): codes at
    ``it * group * post`` (int4: half that, in bytes), scales at ``it * post``."""
    it = tl.program_id(0).to(tl.int64)
    src, m = _group_at(it, base, H, T, G, su, sh, st, n, group, post)
    if PACK4:
        k = 2 * tl.arange(0, PP // 2)
        amax0 = tl.zeros([PP // 2], tl.int32)
        amax1 = tl.zeros([PP // 2], tl.int32)
        for rb in range(0, m, RB):
            rows = rb + tl.arange(0, RB)
            ok = (rows[:, None] < m) & (k[None, :] < post)
            at = x_ptr + src + rows[:, None] * post + k[None, :]
            amax0 = tl.maximum(amax0, _amax_bits(tl.load(at, mask=ok, other=0.0), BITS, 0))
            amax1 = tl.maximum(amax1, _amax_bits(tl.load(at + 1, mask=ok, other=0.0), BITS, 0))
        a0 = _from_bits(amax0, BITS)
        a1 = _from_bits(amax1, BITS)
        kk = tl.arange(0, PP // 2)
        tl.store(scales_ptr + it * post + k, tl.math.div_rn(a0, qmax), mask=k < post)
        tl.store(scales_ptr + it * post + k + 1, tl.math.div_rn(a1, qmax), mask=k < post)
        inv0 = _inv(a0, qmax, tiny)
        inv1 = _inv(a1, qmax, tiny)
        for rb in range(0, group, RB):
            rows = rb + tl.arange(0, RB)
            ok = (rows[:, None] < m) & (k[None, :] < post)
            at = x_ptr + src + rows[:, None] * post + k[None, :]
            x0 = tl.load(at, mask=ok, other=0.0).to(tl.float32)
            x1 = tl.load(at + 1, mask=ok, other=0.0).to(tl.float32)
            n0 = _rint(x0 * inv0[None, :]).to(tl.int32) + 8
            n1 = _rint(x1 * inv1[None, :]).to(tl.int32) + 8
            byte = (n0 | (n1 << 4)).to(tl.uint8)
            keep = (rows[:, None] < group) & (k[None, :] < post)
            tl.store(codes_ptr + (it * group * post) // 2 + rows[:, None] * (post // 2) + kk[None, :], byte,
                     mask=keep)
    else:
        k = tl.arange(0, PP)
        amax = tl.zeros([PP], tl.int32)
        for rb in range(0, m, RB):
            rows = rb + tl.arange(0, RB)
            ok = (rows[:, None] < m) & (k[None, :] < post)
            xv = tl.load(x_ptr + src + rows[:, None] * post + k[None, :], mask=ok, other=0.0)
            amax = tl.maximum(amax, _amax_bits(xv, BITS, 0))
        a = _from_bits(amax, BITS)
        tl.store(scales_ptr + it * post + k, tl.math.div_rn(a, qmax), mask=k < post)
        inv = _inv(a, qmax, tiny)
        for rb in range(0, group, RB):
            rows = rb + tl.arange(0, RB)
            ok = (rows[:, None] < m) & (k[None, :] < post)
            xv = tl.load(x_ptr + src + rows[:, None] * post + k[None, :], mask=ok, other=0.0).to(tl.float32)
            code = _rint(xv * inv[None, :]).to(tl.int32).to(tl.int8)
            keep = (rows[:, None] < group) & (k[None, :] < post)
            tl.store(codes_ptr + it * group * post + rows[:, None] * post + k[None, :], code, mask=keep)


@triton.jit
def decode_rows(out_ptr, codes_ptr, scales_ptr, items, base, H, T, G, su, sh, st, n, group,
                PACK4: tl.constexpr, ITEMS: tl.constexpr, GP: tl.constexpr, BF16: tl.constexpr):
    """Inverse of :func:`encode_rows`: ``code * scale`` into the part's elements (padding skipped)."""
    it = tl.program_id(0).to(tl.int64) * ITEMS + tl.arange(0, ITEMS).to(tl.int64)
    live = it < items
    dst, m = _group_at(it, base, H, T, G, su, sh, st, n, group, 1)
    s = tl.load(scales_ptr + it, mask=live, other=0.0)
    if PACK4:
        e = tl.arange(0, GP // 2)
        j = 2 * e
        b = tl.load(codes_ptr + (it * (group // 2))[:, None] + e[None, :],
                    mask=live[:, None] & (j[None, :] < m[:, None]), other=0).to(tl.int32)
        lo = _out(((b & 15) - 8).to(tl.float32) * s[:, None], out_ptr, BF16)
        hi = _out(((b >> 4) - 8).to(tl.float32) * s[:, None], out_ptr, BF16)
        tl.store(out_ptr + dst[:, None] + j[None, :], lo, mask=live[:, None] & (j[None, :] < m[:, None]))
        tl.store(out_ptr + dst[:, None] + (j + 1)[None, :], hi,
                 mask=live[:, None] & ((j + 1)[None, :] < m[:, None]))
    else:
        j = tl.arange(0, GP)
        ok = live[:, None] & (j[None, :] < m[:, None])
        c = tl.load(codes_ptr + (it * group)[:, None] + j[None, :], mask=ok, other=0)
        tl.store(out_ptr + dst[:, None] + j[None, :], _out(c.to(tl.float32) * s[:, None], out_ptr, BF16), mask=ok)


@triton.jit
def decode_cols(out_ptr, codes_ptr, scales_ptr, base, H, T, G, su, sh, st, n, post, group,
                PACK4: tl.constexpr, RB: tl.constexpr, PP: tl.constexpr, BF16: tl.constexpr):
    """Inverse of :func:`encode_cols`."""
    it = tl.program_id(0).to(tl.int64)
    dst, m = _group_at(it, base, H, T, G, su, sh, st, n, group, post)
    if PACK4:
        kk = tl.arange(0, PP // 2)
        k = 2 * kk
        s0 = tl.load(scales_ptr + it * post + k, mask=k < post, other=0.0)
        s1 = tl.load(scales_ptr + it * post + k + 1, mask=k < post, other=0.0)
        for rb in range(0, m, RB):
            rows = rb + tl.arange(0, RB)
            ok = (rows[:, None] < m) & (k[None, :] < post)
            b = tl.load(codes_ptr + (it * group * post) // 2 + rows[:, None] * (post // 2) + kk[None, :],
                        mask=ok, other=0).to(tl.int32)
            at = out_ptr + dst + rows[:, None] * post + k[None, :]
            tl.store(at, _out(((b & 15) - 8).to(tl.float32) * s0[None, :], out_ptr, BF16), mask=ok)
            tl.store(at + 1, _out(((b >> 4) - 8).to(tl.float32) * s1[None, :], out_ptr, BF16), mask=ok)
    else:
        k = tl.arange(0, PP)
        s = tl.load(scales_ptr + it * post + k, mask=k < post, other=0.0)
        for rb in range(0, m, RB):
            rows = rb + tl.arange(0, RB)
            ok = (rows[:, None] < m) & (k[None, :] < post)
            c = tl.load(codes_ptr + it * group * post + rows[:, None] * post + k[None, :], mask=ok, other=0)
            tl.store(out_ptr + dst + rows[:, None] * post + k[None, :], _out(c.to(tl.float32) * s[None, :], out_ptr, BF16),
                     mask=ok)


@triton.jit
def _group_at(it, base, H, T, G, su, sh, st, n, group, post):
    """(first element, rows) of flat group ``it`` over ``[U, H, T, G]``, ``G`` fastest (the order of the CPU
    kernels' groups, and so of the codes and scales)."""
    r = it // G
    gi = it - r * G
    u = r // (H * T)
    rem = r - u * (H * T)
    h = rem // T
    t = rem - h * T
    j0 = gi * group
    return base + u * su + h * sh + t * st + j0 * post, tl.minimum(n - j0, group)


@triton.jit
def _amax_bits(xv, BITS: tl.constexpr, axis: tl.constexpr):
    """Max of the sign-cleared bit patterns along ``axis`` (int32): the magnitude's order, NaN above inf."""
    if BITS == 32:
        b = xv.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:
        b = xv.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    return tl.max(b, axis=axis)


@triton.jit
def _from_bits(amax, BITS: tl.constexpr):
    """The float32 value of a maximum from :func:`_amax_bits` (``BITS``: 32 fp32, 16 bf16, -16 fp16)."""
    if BITS == 32:
        return amax.to(tl.float32, bitcast=True)
    elif BITS == 16:
        return amax.to(tl.int16).to(tl.bfloat16, bitcast=True).to(tl.float32)
    else:
        return amax.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _inv(a, qmax, tiny):
    """``(1 / amax) * qmax``, two float32 roundings as torch's reciprocal-then-multiply; 0 for a group at or below
    ``tiny`` (its divisor is replaced first, so no division by zero is ever evaluated)."""
    one = tl.full(a.shape, 1.0, tl.float32)
    return tl.where(a <= tiny, 0.0, tl.math.div_rn(one, tl.where(a <= tiny, one, a)) * qmax)


@triton.jit
def _out(f, out_ptr, BF16: tl.constexpr):
    """A float32 value as the output stores it: bf16 rounded to nearest even by hand on the bit pattern (the
    output is then viewed as int16), the same integer steps as the CPU kernels (Triton's interpreter rounds a
    bf16 downcast half-up, the GPU to nearest even; by hand both agree); other dtypes by conversion."""
    if BF16:
        bits = f.to(tl.int32, bitcast=True)
        # NaN (a payload with a non-finite scale) as the CPU kernels write it: the rounding would wrap it
        return tl.where(f != f, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16)
    else:
        return f.to(out_ptr.dtype.element_ty)


@triton.jit
def _rint(v):
    """Round half to even for ``|v| < 2^22`` (codes are at most ``qmax``): see the module docstring."""
    return (v + MAGIC) - MAGIC
