"""The numba kernels behind :mod:`fused` (import only through it: it picks the threading layer first).


Bit-exactness notes live in :mod:`fused`'s docstring. Helpers are typed by the array's dtype (bf16 arrives
as uint16, fp16 as int16, see ``fused.as_bits``) through ``overload``, so each dtype compiles its own
straight-line loops and nothing branches on the dtype per element.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from qwen3vl_ray.codecs.groups import TINY

# -- payload segment digests (format version 2, see codecs.base) ----------------------------------------------
# The kernels call python-xxhash's own XXH3_64bits (its runtime-dispatched AVX2/AVX-512 build) by a symbol name
# registered with LLVM here, so the compiled code caches on disk (a ctypes pointer in a kernel would not) and
# hashes each segment of codes while it is still in L1/L2, on every kernel thread: one serial xxh3 pass over an
# 18 MiB payload, after the kernel had pushed it out of cache, cost ~0.5-0.7 ms of a 36 MiB chunk's ~1.9 ms.
import ctypes as _ctypes  # noqa: E402

import llvmlite.binding as _llb  # noqa: E402
import xxhash as _xxhash  # noqa: E402
from numba.core import cgutils as _cgutils  # noqa: E402

_XXH = _ctypes.CDLL(_xxhash._xxhash.__file__)
# The x86 builds export a runtime-dispatched entry (AVX2/AVX-512); other builds (aarch64) only the plain one,
# which computes the same hash.
try:
    _XXH3 = _XXH.XXH3_64bits_dispatch
except AttributeError:
    _XXH3 = _XXH.XXH3_64bits
_XXH3.restype = _ctypes.c_uint64
_XXH3.argtypes = [_ctypes.c_char_p, _ctypes.c_size_t]
if _XXH3(b"warm", 4) != _xxhash.xxh3_64_intdigest(b"warm"):  # also picks the vector width once, before threads race to
    raise ImportError(f"{_xxhash._xxhash.__file__}: its XXH3_64bits is not python-xxhash's xxh3_64")
_llb.add_symbol("qwen3vl_ray_xxh3_64", _ctypes.cast(_XXH3, _ctypes.c_void_p).value)


@intrinsic
def _xxh3(typingctx, arr, start, n):
    """xxh3_64 of ``arr``'s bytes ``[start, start + n)`` (a contiguous uint8 array)."""
    sig = types.uint64(arr, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), ir.IntType(8).as_pointer())
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(8).as_pointer(), ir.IntType(64)])
        return builder.call(_cgutils.get_or_insert_function(builder.module, fnty, "qwen3vl_ray_xxh3_64"), [ptr, args[2]])
    return sig, codegen


@numba.njit(inline="always")
def _hash_range(buf, b0, b1, seg, digests):
    """Digests of the segments of ``buf`` in bytes ``[b0, b1)``: ``b0`` is a segment start, ``b1`` one or the end."""
    for a in range(b0, b1, seg):
        digests[a // seg] = _xxh3(buf, a, min(b1, a + seg) - a)


@numba.njit(parallel=True, cache=True, nogil=True)
def segment_digests(buf, seg, digests):
    """xxh3_64 of each ``seg``-byte segment of ``buf`` (the last may be shorter) into ``digests``, in parallel."""
    n = buf.size
    for i in prange(digests.size):
        a = i * seg
        digests[i] = _xxh3(buf, a, min(n, a + seg) - a)


@intrinsic
def _prefetch(typingctx, arr, i):
    """Ask for the cache line of ``arr[i]`` ahead of its use (``llvm.prefetch``: read, into L2 and up; no fault
    on any address, but callers keep ``i`` inside the array)."""
    sig = types.void(arr, types.intp)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
        builder.call(_cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0"),
                     [ptr, i32(0), i32(PREFETCH_LOCALITY), i32(1)])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _put_f32(typingctx, buf, at, f):
    """Store float32 ``f`` at byte ``at`` of the uint8 array ``buf``, unaligned: a payload buffer starts at any
    offset, and the scales go straight into it (no aligned scratch array, copy and second hashing pass)."""
    sig = types.void(buf, types.intp, types.float32)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), ir.FloatType().as_pointer())
        builder.store(args[2], ptr, align=1)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _get_f32(typingctx, buf, at):
    """The float32 at byte ``at`` of the uint8 array ``buf``, unaligned (see :func:`_put_f32`)."""
    sig = types.float32(buf, types.intp)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), ir.FloatType().as_pointer())
        return builder.load(ptr, align=1)
    return sig, codegen


#: llvm.prefetch locality: 3 (prefetcht0, L1), 2 (prefetcht1, L2)
PREFETCH_LOCALITY = 2
#: how far ahead of the loads the encode kernels ask for the input (bytes)
PREFETCH_AHEAD = 8192


@intrinsic
def _f32_from_bits(typingctx, u):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _bits_from_f32(typingctx, f):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _f32_from_half(typingctx, h):
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.int16), codegen


@intrinsic
def _half_from_f32(typingctx, f):
    # fptrunc rounds to nearest even (IEEE default), as torch's float -> half cast does
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.int16(types.float32), codegen


def _load(x, i):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_load, inline="always")
def _load_impl(x, i):
    dt = x.dtype
    if dt == types.uint16:  # bf16: the top half of a float32
        return lambda x, i: _f32_from_bits(np.uint32(x[i]) << np.uint32(16))
    if dt == types.int16:
        return lambda x, i: _f32_from_half(x[i])
    if dt == types.float32:
        return lambda x, i: x[i]
    if dt == types.float64:
        return lambda x, i: np.float32(x[i])
    return None


@numba.njit(inline="always")
def _bf16_rne(f):
    """float32 ``f``'s bits rounded to nearest even at bit 16 (c10::BFloat16's round_to_nearest_even): the
    bf16 is the top half; the caller handles NaN."""
    u = _bits_from_f32(f)
    return u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))


def _store(out, i, f):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_store, inline="always")
def _store_impl(out, i, f):
    dt = out.dtype
    if dt == types.uint16:
        def store_bf16(out, i, f):
            # NaN -> 0x7FC0, as c10::BFloat16
            if f != f:
                out[i] = np.uint16(0x7FC0)
            else:
                out[i] = np.uint16(_bf16_rne(f) >> np.uint32(16))
        return store_bf16
    if dt == types.int16:
        def store_f16(out, i, f):
            out[i] = _half_from_f32(f)
        return store_f16
    if dt == types.float32:
        def store_f32(out, i, f):
            out[i] = f
        return store_f32
    if dt == types.float64:
        def store_f64(out, i, f):
            out[i] = np.float64(f)
        return store_f64
    return None


def _key(x, i):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_key, inline="always")
def _key_impl(x, i):
    """|x[i]|'s ordering key: the sign-cleared bit pattern (orders like |x| for finite values; inf and NaN
    sort above every finite value, so a non-finite group gets a non-finite amax). As narrow as the input's
    bits (uint16 for bf16 / fp16): numba widens integer arithmetic to 64 bits, and a key left that wide made
    LLVM run the amax loops on 4-8 lanes per vector instead of 16-32 (1 MiB of a KV chunk's bf16 values, one
    thread: ~115 -> ~80 us per encode, measured)."""
    dt = x.dtype
    if dt in (types.uint16, types.int16):
        return lambda x, i: np.uint16(np.uint16(x[i]) & np.uint16(0x7FFF))
    if dt == types.float32:
        return lambda x, i: np.uint32(_bits_from_f32(x[i]) & np.uint32(0x7FFFFFFF))
    if dt == types.float64:
        return lambda x, i: np.uint32(_bits_from_f32(np.float32(x[i])) & np.uint32(0x7FFFFFFF))
    return None


def _key0(x):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_key0, inline="always")
def _key0_impl(x):
    """The smallest :func:`_key` (of a zero), in the key's own type: an amax starts there."""
    if x.dtype in (types.uint16, types.int16):
        return lambda x: np.uint16(0)
    return lambda x: np.uint32(0)


def _keys(x, n):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_keys, inline="always")
def _keys_impl(x, n):
    """An uninitialized array of ``n`` keys (per-channel maxima) in the key's type."""
    if x.dtype in (types.uint16, types.int16):
        return lambda x, n: np.empty(n, np.uint16)
    return lambda x, n: np.empty(n, np.uint32)


def _unkey(x, m):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_unkey, inline="always")
def _unkey_impl(x, m):
    """The float32 value of a :func:`_key` (the group's amax)."""
    dt = x.dtype
    if dt == types.uint16:
        return lambda x, m: _f32_from_bits(np.uint32(m) << np.uint32(16))
    if dt == types.int16:
        return lambda x, m: _f32_from_half(np.int16(m))
    if dt in (types.float32, types.float64):
        return lambda x, m: _f32_from_bits(np.uint32(m))
    return None


@numba.njit(inline="always")
def _inv(a, qmax):
    # torch's ``qmax / amax`` is reciprocal-then-multiply, both rounded to float32; tiny groups -> zeros
    return np.float32(0.0) if a <= np.float32(TINY) else np.float32(np.float32(1.0) / a) * qmax


@numba.njit(inline="always")
def _code8(f, s):
    # rint: round half to even, as torch.round; the codes are in [-qmax, qmax] for finite inputs
    return np.uint8(np.int32(np.rint(f * s)) & np.int32(255))


@numba.njit(inline="always")
def _nib(f, s):
    return np.uint8(np.int32(np.rint(f * s)) + 8)


def _orig(x, i):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_orig, inline="always")
def _orig_impl(x, i):
    if x.dtype == types.float64:
        return lambda x, i: x[i]
    return lambda x, i: np.float64(_load(x, i))


# reassoc only here (a sum of squares may be added in any order; it vectorizes that way), never in the
# kernels, whose every rounding step must match torch's
def _rounded(x, f):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_rounded, inline="always")
def _rounded_impl(x, f):
    """float32 ``f`` rounded to ``x``'s dtype as decode stores it, back in float32 (float64 stores are exact)."""
    dt = x.dtype
    if dt == types.uint16:
        def bf16(x, f):
            return _f32_from_bits(_bf16_rne(f) & np.uint32(0xFFFF0000))
        return bf16
    if dt == types.int16:
        return lambda x, f: _f32_from_half(_half_from_f32(f))
    if dt in (types.float32, types.float64):
        return lambda x, f: f
    return None


@numba.njit(inline="always")
def _err_terms(x, f, inv, scale):
    """(error of the decoded value, input) in code units (times ``inv``): magnitudes ~1 and <= qmax, so
    float32 squares neither overflow nor lose small groups' errors."""
    y = f * inv
    d = _rounded(x, np.rint(y) * scale)
    return (f - d) * inv, y


@numba.njit(fastmath={"reassoc"}, cache=True, nogil=True)
def _code_err(xs, inv, scale, m):
    """(sum of squared decode errors, sum of squared inputs) of one group, in code units (see _err_terms)."""
    e2 = np.float32(0.0)
    y2 = np.float32(0.0)
    for j in range(m):
        e, y = _err_terms(xs, _load(xs, j), inv, scale)
        e2 += e * e
        y2 += y * y
    return e2, y2


@numba.njit(fastmath={"reassoc"}, cache=True, nogil=True)
def _steps2(xs, s, m):
    """Sum of the squared rounding steps of one group's codes in code units, ``(y - rint(y))^2`` with ``y = x * s``
    as _code8 and _nib compute it (the steps bound, ``measure`` 4). ``y - rint(y)`` is exact in float32 (rint(y)
    is 0 or within a factor 2 of y); the squares and their sum round (fused._bound_sums allows for it)."""
    e2 = np.float32(0.0)
    for j in range(m):
        y = _load(xs, j) * s
        e = y - np.rint(y)
        e2 += e * e
    return e2


@numba.njit(cache=True, nogil=True)
def _tiny_err(xs, m):
    """A group stored as zeros (amax <= TINY): every input is its own error (float64: squares of 1e-30)."""
    x2 = 0.0
    for j in range(m):
        o = _orig(xs, j)
        x2 += o * o
    return x2


@numba.njit(fastmath={"reassoc"}, cache=True, nogil=True)
def _scale_sums(scales, g0, g1, post, qmax, largest):
    """The bound's sums of the scales of groups ``[g0, g1)`` (``post`` each; float32 at any byte offset of
    ``scales``), in float64: their squares where the group was quantized, and where it was stored as zeros.

    Taken from the scales the chunk just wrote, in loops that vectorize, instead of as each group is quantized
    (float64 adds in a chain per group and channel): the cheap bound's cost over a plain encode of a 2 MiB KV
    chunk went from 14% to 10% on one thread, 22% to 18.5% on two (kernels alone, paired runs). A group was
    quantized iff its amax exceeds TINY (``_inv``); ``scale = amax / qmax`` rounds monotonically, so a scale
    above ``TINY / qmax`` (rounded) says quantized, one below says zeros, and one equal to it is counted as both
    (an upper bound of the error either way). Any order of the adds: the bound's rounding allowances
    (fused.bound_error, fused._bound_sums) cover a float64 sum's rounding.

    The third sum (only where ``largest``, else 0), ``qmax^2`` times the normal scales' squares (rounded down by
    2^-22), is a lower bound of the squared norm of the groups' largest inputs (the ``amax`` bound's, see ENCODE):
    ``scale = fl(amax / qmax)`` is at most ``amax / qmax (1 + 2^-24)``, and a subnormal scale, rounded by an
    absolute 2^-150, is left out."""
    thr = np.float32(np.float32(TINY) / qmax)
    normal = np.float32(np.finfo(np.float32).tiny)
    q2 = 0.0
    z2 = 0.0
    a2 = 0.0
    for b in range(g0 * post, g1 * post):
        sa = _get_f32(scales, 4 * b)
        s2 = np.float64(sa) * np.float64(sa)
        q2 += s2 if sa >= thr else 0.0
        z2 += s2 if sa <= thr else 0.0
        a2 += s2 if largest and sa >= normal else 0.0
    qq = np.float64(qmax) * np.float64(qmax)
    return q2, z2, a2 * qq * (1.0 - 2.0 ** -22)


@numba.njit(fastmath={"reassoc"}, cache=True, nogil=True)
def _lane_sum(lanes):
    """The float64 sum of float32 ``lanes`` in any order (it vectorizes; a chain of adds cost ~4 cycles per lane
    per chunk)."""
    t = 0.0
    for j in range(lanes.size):
        t += np.float64(lanes[j])
    return t


@numba.njit(inline="always")
def _split(U, H, T, n, group, post, per):
    """(groups per row G, groups in all, codes per group, chunks of ``per`` groups, one per parallel task) of
    ``U * H * T`` rows of ``n`` elements by ``post`` channels, in groups of ``group``."""
    G = (n + group - 1) // group
    items = U * H * T * G
    return G, items, group * post, (items + per - 1) // per


@numba.njit(inline="always")
def _group_at(i, G, H, T):
    """(u, h, t, gi) of flat group ``i`` over [U, H, T, G]; a chunk finds its first group so, then walks on
    with :func:`_next_group` (carries, no division per group)."""
    r = i // G
    gi = i - r * G
    u = r // (H * T)
    t = r - u * H * T
    h = t // T
    return u, h, t - h * T, gi


@numba.njit(inline="always")
def _next_group(u, h, t, gi, G, H, T):
    """The group after (u, h, t, gi): ``gi`` advances and carries into ``t``, ``h``, ``u``."""
    gi += 1
    if gi == G:
        gi = 0
        t += 1
        if t == T:
            t = 0
            h += 1
            if h == H:
                h = 0
                u += 1
    return u, h, t, gi


@numba.njit(inline="always")
def _max2x2(xs, k, post):
    """(the larger key of ``xs[k]`` and ``xs[k + post]``, that of ``xs[k + 2 * post]`` and ``xs[k + 3 * post]``):
    four rows of one channel in pairs."""
    b0 = _key(xs, k)
    b1 = _key(xs, k + post)
    b2 = _key(xs, k + 2 * post)
    b3 = _key(xs, k + 3 * post)
    return (b0 if b0 > b1 else b1), (b2 if b2 > b3 else b3)


@numba.njit(inline="always")
def _max4(xs, k, post, m):
    """The largest of ``m`` and the keys of ``xs[k + i * post]``, ``i`` < 4 (four rows of one channel)."""
    b0, b2 = _max2x2(xs, k, post)
    b0 = b0 if b0 > b2 else b2
    return b0 if b0 > m else m


@numba.njit(inline="always")
def _encode_body(x, base, U, su, H, sh, T, st, n, post, group, qmax, pack4, per, codes, scales, rows, measure,
                 seg, digests, sdigests):
    G, items, gsize, nchunks = _split(U, H, T, n, group, post, per)
    # the measure's sums per chunk, added up in chunk order after the parallel loop (the same sums on any number of
    # threads); summed here rather than by numpy after the launch, which cost ~3 us per part
    width = 3 if measure >= 2 else 2 if measure else 0
    # empty, not zeros: every chunk writes its own sums, and here, outside the prange, numba makes np.zeros a
    # parallel loop of its own -- a second OpenMP launch per part, which cost the bounds ~3-5 us of their ~8-12 us
    # over a plain encode of each 1 MiB part of a 2 MiB KV chunk, and a plain encode ~1-3 us for an empty array
    # (two threads, paired runs; NUMBA_DEBUG_ARRAY_OPT_STATS=1 lists the parallel loops numba made)
    err = np.empty(width * nchunks, np.float64)
    bad = 0  # groups whose scale is not finite (a NaN or inf input): the caller refuses the tensor
    for c in prange(nchunks):
        i0 = c * per
        i1 = min(items, i0 + per)
        e2 = 0.0
        x2 = 0.0
        ssum = 0.0  # the steps bound's (measure 4) squared steps, scaled back by the groups' squared scales
        amax = _keys(x, post)
        inv = np.empty(post, np.float32)
        scl = np.empty(post, np.float32)
        # per-channel error sums in code units (measure only): one lane per channel, no reduction to reorder
        ek = np.zeros(post if (measure == 1 or measure == 4) and post > 1 else 0, np.float32)
        yk = np.zeros(post if measure == 1 and post > 1 else 0, np.float32)
        # bound (measure >= 2): squared float32 inputs in per-lane float32 sums (one lane per channel, or per
        # position in a row's group: no reduction to reorder, so the loops stay vectorized); the rest of the
        # bound comes from the scales (_scale_sums, at the chunk's end). The cheap bound (measure == 3) squares
        # only the largest of each two or four inputs, which the amax loops find anyway (see ENCODE)
        # (the amax bound, measure 5, squares none: a row group's largest input comes from its scale; along a
        # channel ENCODE runs the measure 3 kernel for it, so no per-channel kernel sees measure 5)
        xl = np.zeros((post if post > 1 else group) if measure >= 2 and measure != 5 else 0, np.float32)
        # steps bound, per channel: each channel's squared steps times its squared scale, one float64 lane each
        sl = np.zeros(post if measure == 4 and post > 1 else 0, np.float64)
        # int4 packs straight into the payload when every group (or, per channel, every row) starts on a
        # byte; else (odd sizes) and when measuring, nibbles go through the chunk's scratch first
        direct = pack4 and (group % 2 == 0 if post == 1 else post % 2 == 0)
        nib = np.empty(per * gsize if pack4 and not direct else 0, np.uint8)
        # per channel: the input a little ahead of the amax pass, which only streams and waited on DRAM for most of
        # a 2 MiB chunk's keys (measured; the same in the row path cost more than it hid); clamped inside the array
        line = max(1, 64 // x.itemsize)
        ahead = PREFETCH_AHEAD // x.itemsize
        last = x.size - 1
        u, h, t, gi = _group_at(i0, G, H, T)
        for it in range(i0, i1):
            src = base + u * su + h * sh + t * st
            j0 = gi * group
            j1 = min(n, j0 + group)
            # codes of this group: codes[cb:] for int8, nib[nb:] (chunk scratch) for int4
            cb = it * gsize
            nb = (it - i0) * gsize
            # this group's inputs are squared (the full and steps bounds)
            squares = measure == 2 or measure == 4
            if rows:
                m = _key0(x)
                xs = x[src + j0: src + j1]
                if measure == 3 and j1 - j0 == 128:
                    # the cheap bound: the largest of each four inputs j, j + q, j + 2q, j + 3q (q a quarter of the
                    # group: whole vectors, no shuffles), squared in the amax loop. The default group gets a
                    # constant trip count: a 2 MiB KV chunk's values then cost +5-10% over a plain encode
                    # against +26-28% with q known only at run time, and +16-17% for squaring every other
                    # group's inputs in a loop of their own (kernels alone, two threads, paired runs)
                    for j in range(32):
                        b = _max4(xs, j, 32, _key0(x))
                        m = b if b > m else m
                        f = _unkey(x, b)
                        xl[j] += f * f
                elif measure == 3:
                    q = (j1 - j0) // 4
                    for j in range(q):
                        b = _max4(xs, j, q, _key0(x))
                        m = b if b > m else m
                        f = _unkey(x, b)
                        xl[j] += f * f
                    for j in range(4 * q, j1 - j0):
                        b = _key(xs, j)
                        m = b if b > m else m
                        f = _unkey(x, b)
                        xl[j] += f * f
                else:
                    for j in range(j1 - j0):
                        b = _key(xs, j)
                        m = b if b > m else m
                if squares:  # a loop of its own: in the max loop it costs 3x more (measured)
                    for j in range(j1 - j0):
                        f = _load(xs, j)
                        xl[j] += f * f
                a = _unkey(x, m)
                sa = a / qmax
                _put_f32(scales, 4 * it, sa)
                if not np.isfinite(sa):
                    bad += 1
                s = _inv(a, qmax)
                if direct:
                    ob = codes[cb // 2: cb // 2 + group // 2]
                    mm = j1 - j0
                    for e in range(mm // 2):
                        ob[e] = _nib(_load(xs, 2 * e), s) | (_nib(_load(xs, 2 * e + 1), s) << np.uint8(4))
                    if mm % 2:
                        ob[mm // 2] = _nib(_load(xs, mm - 1), s) | np.uint8(8 << 4)
                    for e in range((mm + 1) // 2, group // 2):
                        ob[e] = np.uint8(0x88)
                elif pack4:
                    cs = nib[nb: nb + group]
                    for j in range(j1 - j0):
                        cs[j] = _nib(_load(xs, j), s)
                    for j in range(j1 - j0, group):
                        cs[j] = np.uint8(8)
                else:
                    cs = codes[cb: cb + group]
                    for j in range(j1 - j0):
                        cs[j] = _code8(_load(xs, j), s)
                    for j in range(j1 - j0, group):
                        cs[j] = np.uint8(0)
                if measure == 4 and s > 0:  # one float64 add per group: its chain is not what the loop waits on
                    ssum += np.float64(_steps2(xs, s, j1 - j0)) * (np.float64(sa) * np.float64(sa))
                if measure == 1:
                    if s > 0:
                        ce, cy = _code_err(xs, s, sa, j1 - j0)
                        w = np.float64(s) * np.float64(s)
                        e2 += np.float64(ce) / w
                        x2 += np.float64(cy) / w
                    else:
                        t2 = _tiny_err(xs, j1 - j0)
                        e2 += t2
                        x2 += t2
            else:
                for k in range(post):
                    amax[k] = _key0(x)
                # four rows per pass over the channels: the per-channel maxima are loaded and stored once per
                # four rows, not per row (they, not the input, bounded this loop)
                jq = j0 + (j1 - j0) // 4 * 4
                for j in range(j0, jq, 4):
                    xs = x[src + j * post: src + (j + 4) * post]
                    for p in range(0, 4 * post, line):
                        _prefetch(x, min(src + j * post + ahead + p, last))
                    if squares:  # the bound's squares in the same pass (any order: one sum per lane)
                        for k in range(post):
                            amax[k] = _max4(xs, k, post, amax[k])
                            f0 = _load(xs, k)
                            f1 = _load(xs, k + post)
                            f2 = _load(xs, k + 2 * post)
                            f3 = _load(xs, k + 3 * post)
                            xl[k] += (f0 * f0 + f1 * f1) + (f2 * f2 + f3 * f3)
                    elif measure == 3:
                        # the cheap bound: the larger of each two rows (found anyway), squared. Not of four: a
                        # channel steady across tokens (a RoPE'd key's outlier) then keeps only a quarter of its
                        # squared norm, and such channels hold most of the keys' (the bound went from 3.0x to 3.4x
                        # the error on the benchmark's KV chunk; two rows: 2.8x, for a cost within the noise)
                        for k in range(post):
                            b0, b2 = _max2x2(xs, k, post)
                            b = b0 if b0 > b2 else b2
                            amax[k] = b if b > amax[k] else amax[k]
                            f = _unkey(x, b0)
                            g = _unkey(x, b2)
                            xl[k] += f * f + g * g
                    else:
                        for k in range(post):
                            amax[k] = _max4(xs, k, post, amax[k])
                for j in range(jq, j1):
                    xs = x[src + j * post: src + (j + 1) * post]
                    if squares or measure == 3:
                        for k in range(post):
                            b = _key(xs, k)
                            amax[k] = b if b > amax[k] else amax[k]
                            f = _load(xs, k)
                            xl[k] += f * f
                    else:
                        for k in range(post):
                            b = _key(xs, k)
                            amax[k] = b if b > amax[k] else amax[k]
                sb = it * post
                nf = 0
                for k in range(post):
                    a = _unkey(x, amax[k])
                    scl[k] = a / qmax
                    _put_f32(scales, 4 * (sb + k), scl[k])
                    nf += 0 if np.isfinite(scl[k]) else 1
                    inv[k] = _inv(a, qmax)
                bad += nf
                for j in range(j0, j0 + group):
                    xs = x[src + j * post: src + (j + 1) * post]
                    d = (j - j0) * post
                    if direct:
                        ob = codes[(cb + d) // 2: (cb + d) // 2 + post // 2]
                        if j < j1:
                            for kk in range(post // 2):
                                k = 2 * kk
                                ob[kk] = _nib(_load(xs, k), inv[k]) | (_nib(_load(xs, k + 1), inv[k + 1]) << np.uint8(4))
                        else:
                            ob[:] = np.uint8(0x88)
                    elif pack4:
                        cs = nib[nb + d: nb + d + post]
                        if j < j1:
                            for k in range(post):
                                cs[k] = _nib(_load(xs, k), inv[k])
                        else:
                            cs[:] = np.uint8(8)
                    else:
                        cs = codes[cb + d: cb + d + post]
                        if j < j1:
                            for k in range(post):
                                cs[k] = _code8(_load(xs, k), inv[k])
                        else:
                            cs[:] = np.uint8(0)
                    if measure == 1 and j < j1:
                        for k in range(post):
                            e, y = _err_terms(xs, _load(xs, k), inv[k], scl[k])
                            ek[k] += e * e
                            yk[k] += y * y
                    if measure == 4 and j < j1:  # one lane per channel (inside the codes' loop it cost the same)
                        for k in range(post):
                            y = _load(xs, k) * inv[k]
                            e = y - np.rint(y)
                            ek[k] += e * e
                if measure == 4:
                    for k in range(post):
                        w = np.float64(scl[k]) * np.float64(scl[k])
                        sl[k] += np.float64(ek[k]) * w if inv[k] > 0 else 0.0
                        ek[k] = np.float32(0.0)
                if measure == 1:
                    for k in range(post):
                        if inv[k] > 0:
                            w = np.float64(inv[k]) * np.float64(inv[k])
                            e2 += np.float64(ek[k]) / w
                            x2 += np.float64(yk[k]) / w
                        else:
                            for j in range(j0, j1):
                                o = _orig(x, src + j * post + k)
                                e2 += o * o
                                x2 += o * o
                        ek[k] = np.float32(0.0)
                        yk[k] = np.float32(0.0)
            u, h, t, gi = _next_group(u, h, t, gi, G, H, T)
        if pack4 and not direct:
            cnt = (i1 - i0) * gsize
            pb = (i0 * gsize) // 2  # i0 is even (per is), so the chunk starts on a byte
            out = codes[pb: pb + (cnt + 1) // 2]
            for p in range(cnt // 2):
                out[p] = nib[2 * p] | (nib[2 * p + 1] << np.uint8(4))
            if cnt % 2:  # only the very last code of an odd total: it pairs with a zero code (nibble 8)
                out[cnt // 2] = nib[cnt - 1] | np.uint8(8 << 4)
        if digests.size:  # the chunk's codes, just written, while in cache (the caller checked they fill whole segments)
            if pack4:
                _hash_range(codes, (i0 * gsize) // 2, (i1 * gsize + 1) // 2, seg, digests)
            else:
                _hash_range(codes, i0 * gsize, i1 * gsize, seg, digests)
        if measure >= 2:
            # the scales' sums from the chunk's scales, after its groups (see _scale_sums): squared scales of the
            # quantized groups (q2) and of those stored as zeros (z2). Summed here, not by numpy after the launch:
            # np.dot's OpenBLAS threads then fight numba's still-spinning OpenMP workers for the cores (measured
            # ~3.5 ms median per call on two cores)
            q2, z2, a2 = _scale_sums(scales, i0, i1, post, qmax, measure == 5)
            err[3 * c] = a2 if measure == 5 else _lane_sum(xl)
            err[3 * c + 1] = ssum + _lane_sum(sl) if measure == 4 else q2
            err[3 * c + 2] = z2
        elif measure:
            err[2 * c] = e2
            err[2 * c + 1] = x2
    # the scales' digests, after every chunk wrote its own (their segments span chunks): ~1 us per 32 KiB
    _hash_range(scales, 0, scales.size, seg, sdigests)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    for c in range(nchunks if width else 0):
        s0 += err[width * c]
        s1 += err[width * c + 1]
        if width == 3:
            s2 += err[width * c + 2]
    return bad, s0, s1, s2


# nibble values as float32 minus 8 in float32 (exact for 0..15): the int arithmetic ``int32(v) - 8`` types as
# int64 in numba, and LLVM then converts 8 lanes per vector (vcvtqq2ps) instead of 16 (measured 2x slower)
@numba.njit(inline="always")
def _lo(b):
    return np.float32(np.int32(b & np.uint8(15))) - np.float32(8.0)


@numba.njit(inline="always")
def _hi(b):
    return np.float32(np.int32(b >> np.uint8(4))) - np.float32(8.0)


@numba.njit(inline="always")
def _int8(b):
    return np.float32(np.int32(b ^ np.uint8(128)) - 128)


@numba.njit(inline="always")
def _nibble(codes, ci):
    return np.float32(np.int32((codes[ci >> 1] >> np.uint8((ci & 1) * 4)) & np.uint8(15))) - np.float32(8.0)


@numba.njit(inline="always")
def _decode_body(out, base, U, su, H, sh, T, st, n, post, group, pack4, per, codes, scales, rows, seg, digests,
                 sdigests):
    G, items, gsize, nchunks = _split(U, H, T, n, group, post, per)
    for c in prange(nchunks):
        i0 = c * per
        i1 = min(items, i0 + per)
        ss = np.empty(0 if rows else post, np.float32)  # a group's scales, aligned for the loop over its rows
        if digests.size:  # the chunk's codes' digests: the hash brings them into cache for the loop below
            if pack4:
                _hash_range(codes, (i0 * gsize) // 2, (i1 * gsize + 1) // 2, seg, digests)
            else:
                _hash_range(codes, i0 * gsize, i1 * gsize, seg, digests)
        u, h, t, gi = _group_at(i0, G, H, T)
        for it in range(i0, i1):
            dst = base + u * su + h * sh + t * st
            j0 = gi * group
            j1 = min(n, j0 + group)
            m = j1 - j0
            cb = it * gsize  # first code of this group
            if rows:
                s = _get_f32(scales, 4 * it)
                os = out[dst + j0: dst + j1]
                if not pack4:
                    cs = codes[cb: cb + m]
                    for j in range(m):
                        _store(os, j, _int8(cs[j]) * s)
                elif cb % 2 == 0:
                    cs = codes[cb // 2: cb // 2 + (m + 1) // 2]
                    for e in range(m // 2):  # whole bytes: low nibble first
                        b = cs[e]
                        _store(os, 2 * e, _lo(b) * s)
                        _store(os, 2 * e + 1, _hi(b) * s)
                    if m % 2:
                        _store(os, m - 1, _lo(cs[m // 2]) * s)
                else:
                    for j in range(m):
                        _store(os, j, _nibble(codes, cb + j) * s)
            else:
                for k in range(post):
                    ss[k] = _get_f32(scales, 4 * (it * post + k))
                for j in range(j0, j1):
                    os = out[dst + j * post: dst + (j + 1) * post]
                    d = cb + (j - j0) * post
                    if not pack4:
                        cs = codes[d: d + post]
                        for k in range(post):
                            _store(os, k, _int8(cs[k]) * ss[k])
                    elif d % 2 == 0 and post % 2 == 0:
                        cs = codes[d // 2: d // 2 + post // 2]
                        for kk in range(post // 2):
                            b = cs[kk]
                            _store(os, 2 * kk, _lo(b) * ss[2 * kk])
                            _store(os, 2 * kk + 1, _hi(b) * ss[2 * kk + 1])
                    else:
                        for k in range(post):
                            _store(os, k, _nibble(codes, d + k) * ss[k])
            u, h, t, gi = _next_group(u, h, t, gi, G, H, T)
    _hash_range(scales, 0, scales.size, seg, sdigests)


# -- the kernels: one compiled specialization per layout ------------------------------------------------------
# ``rows`` (post == 1: groups run along contiguous rows), ``pack4`` (int4) and ``measure`` (auto's error sums) are
# compile-time constants of each kernel, so LLVM drops the branches a kernel never takes and vectorizes the
# loops that are left: one body serving every case at run time measured 1.4x slower (values of a KV chunk, int8,
# one thread: 14.6 vs 21.2 GB/s). Each specialization compiles on its first use per dtype and is cached on disk.

def _encode_kernel(rows: bool, pack4: bool, measure: int):
    def kernel(x, base, U, su, H, sh, T, st, n, post, group, qmax, per, codes, scales, seg, digests, sdigests):
        return _encode_body(x, base, U, su, H, sh, T, st, n, post, group, qmax, pack4, per, codes, scales, rows,
                            measure, seg, digests, sdigests)
    # distinct names: numba's on-disk cache tells closures of one source line apart by them
    suffix = ("", "_measure", "_bound", "_cheap_bound", "_steps_bound", "_amax_bound")[measure]
    kernel.__name__ = kernel.__qualname__ = f"encode_{'rows' if rows else 'cols'}_{'int4' if pack4 else 'int8'}{suffix}"
    return numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)(kernel)


def _decode_kernel(rows: bool, pack4: bool):
    def kernel(out, base, U, su, H, sh, T, st, n, post, group, per, codes, scales, seg, digests, sdigests):
        _decode_body(out, base, U, su, H, sh, T, st, n, post, group, pack4, per, codes, scales, rows, seg, digests,
                     sdigests)
    kernel.__name__ = kernel.__qualname__ = f"decode_{'rows' if rows else 'cols'}_{'int4' if pack4 else 'int8'}"
    return numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)(kernel)


_FLAGS = (False, True)
#: ``ENCODE[rows, pack4, measure]``: quantize one part of ``x`` into ``codes`` and ``scales`` (the payload's uint8
#: buffers: float32 scales at any alignment), returning ``(bad, s0, s1, s2)``: how many scales are not finite,
#: and the measure's sums (zeros without one). ``measure`` 1: (squared error, squared norm) of the decoded
#: values; 2: (squared float32 inputs (in per-lane float32 sums: a channel's over the ``group`` rows of a group,
#: a row position's over a chunk's groups), squared scales of the quantized groups, squared scales of the groups
#: stored as zeros); 3: as 2, but the first sum squares only the largest of some inputs: per channel, of each
#: two rows (~82% of the squared norm on Gaussian inputs, half on a channel steady across rows); in a row's
#: group, of each four inputs a quarter of the group apart (~62% on Gaussian inputs), any tail squared whole:
#: a lower bound of the norm for a half or a quarter of the squares; 4: as 2, but the second sum is the codes'
#: rounding steps, exactly (squared ``x * inv - code`` in float32 per group, times the group's squared scale in
#: float64) instead of half a step each; 5: as 3 along a channel, but in a row's group only its largest input is
#: counted, read back from its scale (``_scale_sums``): no squares in the group's loop, and ~1/15 of the squared
#: norm of a group of 128 Gaussian inputs, so it proves a budget only where row groups hold little of the norm (a
#: KV chunk's values beside outlier keys). ``digests`` (unless empty) gets the xxh3_64 of each ``seg``-byte
#: segment of ``codes`` (each chunk's codes must fill whole segments); ``sdigests`` gets those of ``scales`` (always:
#: their pass is serial, after the chunks)
ENCODE = {(r, p, m): _encode_kernel(r, p, m) for r in _FLAGS for p in _FLAGS for m in (0, 1, 2, 3, 4)}
# measure 5 along a channel is measure 3: the same kernel, not one more specialization to compile
ENCODE.update({(r, p, 5): _encode_kernel(r, p, 5) if r else ENCODE[r, p, 3] for r in _FLAGS for p in _FLAGS})
#: ``DECODE[rows, pack4]``: write ``codes * scales`` into one part of ``out`` (``scales``, ``seg``, ``digests`` and
#: ``sdigests`` as in ENCODE)
DECODE = {(r, p): _decode_kernel(r, p) for r in _FLAGS for p in _FLAGS}
#: ``SEGMENTS(buf, seg, digests)``: :func:`segment_digests`
SEGMENTS = segment_digests
