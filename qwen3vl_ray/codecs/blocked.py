"""Cache-blocked CPU kernels for group-wise int8 / int4 quantization (the hot path of int8, int4, kv-*).

Why blocks: quantizing is six elementwise passes (absmax, upcast, scale, round, narrow, checksum). Run over
a whole 36 MiB KV chunk, every pass streams the tensor (and a 2x float32 temporary) through DRAM; run over
tiles of ``TILE_ELEMS`` elements, the input is read from DRAM once, the other passes hit cache, and each
tile's codes go straight into the payload buffer (and into the streaming checksum while still in cache).
Absmax runs on the input's bit pattern with the sign bit cleared (an int16 pass for bf16/fp16: no upcast).

The tensor is viewed as ``[pre, n, post]`` (see :mod:`groups`); a tile is either a run of whole rows or,
when one row is larger than a tile, a run of groups inside one row -- either way a contiguous range of the
``[pre, padded, post]`` code layout, so tiles are written, packed and hashed in payload order. Codes and
decoded values equal :func:`groups.quantize_int` / :func:`groups.dequantize`'s: the same float32 arithmetic,
in the same order, on each element (one difference: an all-zero group's scale is +0.0 here, -0.0 there).

int4 packs codes pairwise across tile boundaries only at even offsets; :func:`plan` shrinks tiles to even
sizes and falls back to one tile when the layout has no even split (odd shapes in tests, never real KV).
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from qwen3vl_ray.codecs.groups import TINY, Grouping
from qwen3vl_ray.errors import CodecError

#: elements per tile: 512 Ki -> 1 MiB of bf16 in, 2 MiB float32 + 1 MiB integer scratch (L2/L3-resident).
#: Measured on the 36 MiB 8B chunk: 128 Ki tiles are ~1.5x slower (each tile costs ~15 torch dispatches,
#: ~2-3 us each), 512 Ki and 1 Mi are equal, so the smaller of those keeps the scratch nearer the core.
TILE_ELEMS = 1 << 19

# each float dtype read as a same-size integer, and the mask that clears its sign bit
_ABS_BITS = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}
_LITTLE = sys.byteorder == "little"


@dataclass(slots=True)
class Unit:
    """One ``[pre, n, post]`` piece: source (or destination) view plus its offsets in the code/scale buffers."""

    x3: torch.Tensor  # [pre, n, post], or [pre, q, n, post] when q rows per index cannot merge into one view
    pre: int
    code_off: int  # first code index (element, not byte) in the [pre_total, padded, post] layout
    scale_off: int  # first scale row (index into dim 0 of the [pre_total, G, post] scales)
    q: int = 1  # rows of the [pre_total, ...] layout per index of x3's dim 0


def units(x: torch.Tensor, g: Grouping) -> list[Unit]:
    """Cut ``x`` ([*pre_dims, n, post_dims...] already shaped as ``[..., n, post]``) into viewable 3-d units.

    ``x`` must have ``dim >= 3`` with the last two dims ``n`` and ``post``. Leading dims are merged where the
    strides allow a view, else split (a key slice of a KV chunk has a gap between its heads and layers).
    """
    if x.dim() == 3:
        return [Unit(x, x.shape[0], 0, 0)]
    try:
        flat = x.view(-1, x.shape[-2], x.shape[-1])
        return [Unit(flat, flat.shape[0], 0, 0)]
    except RuntimeError:
        pass
    try:
        # keys of a KV chunk: heads x tokens merge, layers do not (values sit between them); tiles then
        # span whole layers, so 36 layers cost a few tiles instead of one tile (and ~15 dispatches) each
        x4 = x.view(x.shape[0], -1, x.shape[-2], x.shape[-1])
        if x4.shape[1] * g.padded * g.post <= TILE_ELEMS:
            return [Unit(x4, x4.shape[0], 0, 0, x4.shape[1])]
    except RuntimeError:
        pass
    out: list[Unit] = []
    inner = math.prod(x.shape[1:-2])
    for i in range(x.shape[0]):
        for u in units(x[i], g):
            out.append(Unit(u.x3, u.pre, u.code_off + i * inner * g.padded * g.post, u.scale_off + i * inner, u.q))
    return out


def plan(g: Grouping, pre: int, pack4: bool, tile: int | None = None, q: int = 1) -> list[tuple[int, int, int, int]] | None:
    """Tiles ``(p0, p1, g0, g1)`` over one unit's rows and groups; None when int4 pairs cannot be kept aligned.

    With ``q > 1`` a row is ``q`` layout rows and is never split (:func:`units` makes sure one fits a tile).
    """
    tile = tile or TILE_ELEMS
    row = q * g.padded * g.post
    gsize = g.group * g.post
    tiles = []
    if row <= tile or g.ngroups == 1 or q > 1:
        rows = max(1, tile // max(row, 1))
        if pack4 and row % 2:
            rows = max(2, rows - rows % 2)
        for p0 in range(0, pre, rows):
            tiles.append((p0, min(pre, p0 + rows), 0, g.ngroups))
    else:
        per = max(1, tile // gsize)
        if pack4 and gsize % 2:
            if row % 2:
                return None
            per = max(2, per - per % 2)
        for p in range(pre):
            for g0 in range(0, g.ngroups, per):
                tiles.append((p, p + 1, g0, min(g.ngroups, g0 + per)))
    if pack4:
        for p0, p1, g0, g1 in tiles[:-1]:
            if ((p1 - p0) * q * (g1 - g0) * gsize) % 2:
                return None
    return tiles


class Scratch:
    """Scratch tensors for one call (float32 values, integer magnitudes, int8/int16 codes).

    Views over per-thread byte arenas kept between calls: a fresh 2 MiB torch.empty is a new mmap whose
    first-touch page faults cost about as much as quantizing a 2 MiB KV chunk. At most ~6 MiB per thread.
    """

    _local = threading.local()

    def __init__(self, elems: int, idt: torch.dtype | None):
        half = (elems + 1) // 2 + 1
        self.f = self._arena("f", elems * 4).view(torch.float32)
        self.bits = self._arena("bits", elems * 8)[: elems * torch.empty((), dtype=idt).element_size()].view(idt) if idt is not None else None
        self.i16 = self._arena("i16", half * 2).view(torch.int16)
        self.i16b = self._arena("i16b", half * 2).view(torch.int16)
        # per-group scratch of the uniform loops (at most elems / group + 1 groups per tile)
        self.amax_bits = self._arena("amax_bits", (elems + 1) * 8)
        if idt is not None:
            self.amax_bits = self.amax_bits[: (elems + 1) * torch.empty((), dtype=idt).element_size()].view(idt)
        self.inv = self._arena("inv", (elems + 1) * 4).view(torch.float32)
        self.tiny = self._arena("tiny", elems + 1).view(torch.bool)

    @classmethod
    def _arena(cls, name: str, nbytes: int) -> torch.Tensor:
        """``nbytes`` of this thread's arena ``name`` (grown on demand; only tile-sized, so bounded)."""
        buf = getattr(cls._local, name, None)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 64), dtype=torch.uint8)
            setattr(cls._local, name, buf)
        return buf[:nbytes]


def _tile_elems(tiles, g: Grouping, q: int) -> int:
    return max(((p1 - p0) * q * (g1 - g0) * g.group * g.post for p0, p1, g0, g1 in tiles), default=0)


def _fill(buf: torch.Tensor, src: torch.Tensor, width: int) -> torch.Tensor:
    """Copy tile ``src`` [..., m, post] into scratch ``buf`` as [..., width, post], zeroing the padded tail."""
    *lead, m, post = src.shape
    dst = buf[: math.prod(lead) * width * post].view(*lead, width, post)
    dst[..., :m, :].copy_(src)
    if m < width:
        dst[..., m:, :].zero_()
    return dst


def _group_absmax(src: torch.Tensor, rows: int, width: int, gb: int, g: Grouping, sc: Scratch, out: torch.Tensor) -> None:
    """Per-group max |x| of a tile ``src`` [..., m, post] (``rows`` layout rows; m <= width, the missing tail
    counts as 0) into ``out`` [rows, gb, post]. Non-finite inputs give a non-finite maximum; the caller checks
    all scales once at the end.
    """
    spec = _ABS_BITS.get(src.dtype)
    if spec is not None and sc.bits is not None:
        # |x| ordering equals the ordering of the sign-cleared bit pattern: one integer pass, no upcast
        idt, mask = spec
        *lead, m, post = src.shape
        b = sc.bits[: rows * width * post].view(*lead, width, post)
        torch.bitwise_and(src.view(idt), mask, out=b[..., :m, :])
        if m < width:
            b[..., m:, :].zero_()
        out.copy_(b.view(rows, gb, g.group, g.post).amax(2).view(src.dtype))
    else:
        fg = _fill(sc.f, src, width).view(rows, gb, g.group, g.post)
        torch.maximum(fg.amax(2), fg.amin(2).neg_(), out=out)


@dataclass(slots=True)
class Tile:
    """Where one tile of a unit lies, for quantizing and dequantizing alike."""

    x: torch.Tensor  # the unit's elements it covers: [rows, m, post] (or [p1 - p0, q, m, post]), m <= width
    scales: torch.Tensor  # its scales [rows, gb, post]
    rows: int  # layout rows
    gb: int  # groups per row
    width: int  # elements per row, padding included (gb * group)
    cnt: int  # codes
    start: int  # first code index (element, not byte) in the [pre_total, padded, post] layout


def _tiles(u: Unit, g: Grouping, tiles, scales: torch.Tensor):
    """Each ``(p0, p1, g0, g1)`` of ``tiles`` as a :class:`Tile` of unit ``u``."""
    grp, post = g.group, g.post
    for p0, p1, g0, g1 in tiles:
        rows, gb = (p1 - p0) * u.q, g1 - g0
        n0, n1 = g0 * grp, min(g1 * grp, g.n)
        x = u.x3[p0:p1, n0:n1] if u.x3.dim() == 3 else u.x3[p0:p1, :, n0:n1]
        yield Tile(x, scales[u.scale_off + p0 * u.q: u.scale_off + p1 * u.q, g0:g1], rows, gb, gb * grp,
                   rows * gb * grp * post, u.code_off + (p0 * u.q * g.padded + n0) * post)


def quantize_into(u: Unit, g: Grouping, qmax: int, pack4: bool, codes: torch.Tensor, scales: torch.Tensor,
                  tiles, sc: Scratch) -> None:
    """Quantize unit ``u`` into ``codes`` (flat int8, or flat uint8 packed pairs) and ``scales`` [pre, G, post].

    NaN/inf inputs leave non-finite scales (and garbage codes): :func:`quantize` checks the scales once and
    refuses the payload.
    """
    for t in _tiles(u, g, tiles, scales):
        s = t.scales
        _group_absmax(t.x, t.rows, t.width, t.gb, g, sc, s)
        # the plain path's ``qmax / amax`` is reciprocal-then-multiply in torch; same ops, same bits
        inv = s.reciprocal().mul_(qmax).masked_fill_(s <= TINY, 0.0)
        s.div_(qmax)
        f = _fill(sc.f, t.x, t.width).view(t.rows, t.gb, g.group, g.post)
        f.mul_(inv.unsqueeze(2))
        f.round_()
        if not pack4:
            codes[t.start: t.start + t.cnt].view(t.rows, t.gb, g.group, g.post).copy_(f)
        else:
            _pack4(f, t.cnt, t.start, codes, sc)


def _pack4(f: torch.Tensor, cnt: int, start: int, packed: torch.Tensor, sc: Scratch) -> None:
    """Codes [-7, 7] (float32, rounded) -> nibbles ``code + 8``, low nibble first, into ``packed`` at ``start``."""
    npair = (cnt + 1) // 2
    i8 = sc.i16[:npair].view(torch.int8)
    i8[:cnt].copy_(f.reshape(-1))
    i8[:cnt].add_(8)  # nibbles 1..15 (a cheap one-byte pass; the float domain would cost four bytes)
    if cnt % 2:
        i8[cnt] = 8  # the odd last code pairs with a 0 code, as groups.pack_int4 does
    w = sc.i16[:npair]
    # little-endian: an int16 holds (nib1 << 8) + nib0, so w | w >> 4 has nib0 | nib1 << 4 in its low byte
    t = sc.i16b[:npair]
    torch.bitwise_right_shift(w, 4, out=t)
    w.bitwise_or_(t)
    packed[start // 2: start // 2 + npair].copy_(w)  # int16 -> uint8 keeps the low byte


def dequantize_into(u: Unit, g: Grouping, pack4: bool, codes: torch.Tensor, scales: torch.Tensor, tiles,
                    sc: Scratch) -> None:
    """Inverse of :func:`quantize_into`: codes times scales, written into the unit's view of the result."""
    for t in _tiles(u, g, tiles, scales):
        f = sc.f[:t.cnt]
        if not pack4:
            src = codes[t.start: t.start + t.cnt]
            f.copy_(src)
        else:
            src = codes[t.start // 2: t.start // 2 + (t.cnt + 1) // 2]
            f.copy_(_unpack4(src, t.cnt, sc))
        f.view(t.rows, t.gb, g.group, g.post).mul_(t.scales.unsqueeze(2))
        dst = t.x
        dst.copy_(f.view(*dst.shape[:-2], t.width, g.post)[..., : dst.shape[-2], :])


def _uniform(u: Unit, g: Grouping, tiles) -> tuple[int, int]:
    """(full tiles, unit rows per tile) of the leading run of equal whole-row tiles, or (0, 0).

    Those tiles take the batched loops below: every per-tile view comes out of one ``unbind``, so a tile
    costs ~12 torch calls instead of ~35 (each ~3 us here: at 36 tiles per 8B chunk, a fifth of the work).
    Padded groups, group-split rows and the ragged last tile take the general loop.
    """
    if g.padded != g.n or not tiles or tiles[0][2:] != (0, g.ngroups):
        return 0, 0
    rows = tiles[0][1] - tiles[0][0]
    full = u.pre // rows
    if full < 1 or any(t != (i * rows, (i + 1) * rows, 0, g.ngroups) for i, t in enumerate(tiles[:full])):
        return 0, 0
    return full, rows


def _tile_shapes(u: Unit, g: Grouping, rows: int) -> tuple[list[int], list[int]]:
    """Grouped shape of one uniform tile ``[rows, (q), G, group, post]`` and of its scales ``[rows, (q), G, post]``."""
    mid = [u.x3.shape[1]] if u.x3.dim() == 4 else []
    return [rows, *mid, g.ngroups, g.group, g.post], [rows, *mid, g.ngroups, g.post]


def _unit_tiles(x3: torch.Tensor, full: int, rows: int, tshape: list[int]) -> tuple[torch.Tensor, ...]:
    """The unit's first ``full * rows`` rows as ``full`` grouped tile views (dims only split: always a view)."""
    return x3[: full * rows].view(full, *tshape).unbind(0)


def _quantize_uniform(u: Unit, g: Grouping, qmax: int, pack4: bool, codes: torch.Tensor, scales: torch.Tensor,
                      full: int, rows: int, sc: Scratch) -> None:
    """:func:`quantize_into` for ``full`` equal whole-row tiles, same arithmetic in the same order."""
    tshape, sshape = _tile_shapes(u, g, rows)
    cnt, ns = math.prod(tshape), math.prod(sshape)
    xs = _unit_tiles(u.x3, full, rows, tshape)
    spec = _ABS_BITS.get(u.x3.dtype)
    use_bits = spec is not None and sc.bits is not None
    if use_bits:
        idt, mask = spec
        bs = _unit_tiles(u.x3.view(idt), full, rows, tshape)
        bits = sc.bits[:cnt].view(tshape)
        a16 = sc.amax_bits[:ns].view(sshape)
        a16f = a16.view(u.x3.dtype)
    s0 = u.scale_off
    ss = scales[s0: s0 + full * rows * u.q].view(full, *sshape).unbind(0)
    inv = sc.inv[:ns].view(sshape)
    tiny = sc.tiny[:ns].view(sshape)
    inv_b = inv.unsqueeze(-2)
    f = sc.f[:cnt].view(tshape)
    f_flat = sc.f[:cnt]
    step = cnt  # codes per tile
    c0 = u.code_off
    if not pack4:
        cs = codes[c0: c0 + full * step].view(full, *tshape).unbind(0)
    for i in range(full):
        s = ss[i]
        if use_bits:
            # |x| ordering equals the ordering of the sign-cleared bit pattern: one integer pass, no upcast
            torch.bitwise_and(bs[i], mask, out=bits)
            torch.amax(bits, -2, out=a16)
            s.copy_(a16f)
        else:
            f.copy_(xs[i])
            torch.maximum(f.amax(-2), f.amin(-2).neg_(), out=s)
        # the plain path's ``qmax / amax`` is reciprocal-then-multiply in torch; same ops, same bits
        torch.reciprocal(s, out=inv)
        inv.mul_(qmax)
        torch.le(s, TINY, out=tiny)
        inv.masked_fill_(tiny, 0.0)
        s.div_(qmax)
        f.copy_(xs[i])
        f.mul_(inv_b)
        f.round_()
        if not pack4:
            cs[i].copy_(f)
        else:
            _pack4(f_flat, cnt, c0 + i * step, codes, sc)


def _dequantize_uniform(u: Unit, g: Grouping, pack4: bool, codes: torch.Tensor, scales: torch.Tensor,
                        full: int, rows: int, sc: Scratch) -> None:
    """:func:`dequantize_into` for ``full`` equal whole-row tiles (three torch calls per tile for int8)."""
    tshape, sshape = _tile_shapes(u, g, rows)
    cnt = math.prod(tshape)
    xs = _unit_tiles(u.x3, full, rows, tshape)
    s0, c0 = u.scale_off, u.code_off
    ss = scales[s0: s0 + full * rows * u.q].view(full, *sshape).unsqueeze(-2).unbind(0)
    f = sc.f[:cnt].view(tshape)
    if not pack4:
        cs = codes[c0: c0 + full * cnt].view(full, *tshape).unbind(0)
    for i in range(full):
        if not pack4:
            f.copy_(cs[i])
        else:
            start = c0 + i * cnt
            src = codes[start // 2: start // 2 + (cnt + 1) // 2]
            sc.f[:cnt].copy_(_unpack4(src, cnt, sc))
        f.mul_(ss[i])
        xs[i].copy_(f)


def _unpack4(p: torch.Tensor, cnt: int, sc: Scratch) -> torch.Tensor:
    """Packed uint8 pairs -> ``cnt`` int8 codes in [-8, 7] (scratch-backed)."""
    w = sc.i16[: p.numel()]
    w.copy_(p)
    t = sc.i16b[: p.numel()]
    torch.bitwise_and(w, 0xF0, out=t)
    t.bitwise_left_shift_(4)
    w.bitwise_and_(15).bitwise_or_(t)  # bytes: lo nibble, hi nibble
    codes = w.view(torch.int8)[:cnt]
    return codes.sub_(8)


def empty(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor for a decode result.

    Large results come from numpy, which asks the kernel for transparent huge pages (``madvise``); torch's
    allocator does not, and first-touch faults on 4 KiB pages cost more than the dequantization itself
    (measured: 36 MiB fresh torch buffer ~20 ms to fill vs ~5 ms from numpy, 2 ms already mapped).
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < 1 << 22:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def usable(t: torch.Tensor) -> bool:
    """The blocked kernels run on CPU tensors on little-endian hosts; anything else takes the plain path."""
    return _LITTLE and t.device.type == "cpu"


def payload_tensor(buf, dtype: torch.dtype) -> torch.Tensor:
    """A flat, read-only-safe tensor over a payload buffer (never written through)."""
    mv = memoryview(buf)
    if mv.nbytes == 0:
        return torch.empty(0, dtype=dtype)
    if mv.readonly:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": this view is only read
            return torch.from_numpy(np.frombuffer(mv, dtype=np.uint8)).view(dtype)
    return torch.frombuffer(mv, dtype=torch.uint8).view(dtype)


def _layout(x: torch.Tensor, g: Grouping, pack4: bool) -> tuple[list[Unit], list[list[tuple[int, int, int, int]]], int]:
    us = units(x, g)
    tiles = [plan(g, u.pre, pack4, q=u.q) for u in us]
    if pack4 and (any(t is None for t in tiles) or any(u.code_off % 2 for u in us)):
        # no even split: one tile over the whole tensor (odd test shapes only; real KV has even head_dim)
        x3 = x.reshape(g.pre, g.n, g.post)
        us, tiles = [Unit(x3, g.pre, 0, 0)], [[(0, g.pre, 0, g.ngroups)]]
    return us, tiles, max((_tile_elems(t, g, u.q) for u, t in zip(us, tiles)), default=0)


def quantize(x: torch.Tensor, g: Grouping, qmax: int, pack4: bool, codes: torch.Tensor, scales: torch.Tensor,
             codec: str) -> None:
    """Quantize ``x`` (``[..., n, post]``, any strides, ``prod(...) == g.pre``) into payload-backed buffers.

    ``codes``: flat int8 (or uint8 for packed int4) over the payload; ``scales``: float32 ``[pre, G, post]``.
    """
    us, tiles, elems = _layout(x, g, pack4)
    sc = Scratch(elems, _ABS_BITS.get(x.dtype, (None,))[0])
    for u, t in zip(us, tiles):
        full, rows = _uniform(u, g, t)
        if full:
            _quantize_uniform(u, g, qmax, pack4, codes, scales, full, rows, sc)
        quantize_into(u, g, qmax, pack4, codes, scales, t[full:], sc)
    if not bool(torch.isfinite(scales).all()):
        raise CodecError(f"codec {codec!r} cannot encode NaN or inf values; use 'none', 'bf16', 'fp16' or 'zstd'")


def dequantize(out: torch.Tensor, g: Grouping, pack4: bool, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Write codes times scales into ``out`` (``[..., n, post]`` view of the result, any strides)."""
    us, tiles, elems = _layout(out, g, pack4)
    sc = Scratch(elems, None)
    for u, t in zip(us, tiles):
        full, rows = _uniform(u, g, t)
        if full:
            _dequantize_uniform(u, g, pack4, codes, scales, full, rows, sc)
        dequantize_into(u, g, pack4, codes, scales, t[full:], sc)
    if len(us) == 1 and us[0].x3.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
        out.copy_(us[0].x3.view(out.shape))  # the one-tile fallback had to reshape ``out`` into a copy
