"""One-pass CPU kernels (numba) for group-wise int8 / int4 quantization: the fast path of int8, int4, kv-*.

Why: the torch paths (:mod:`groups`, :mod:`blocked`) are chains of elementwise ops, ~6 passes over each tile.
Here one compiled loop per group reads the input once for the absmax and once more from L1/L2 for the codes,
on every core the process owns (``prange`` over chunks of groups).

Payloads are byte-identical to :mod:`blocked`'s (what the CPU writes today): the same float32 operations in
the same order on each element -- absmax on the sign-cleared bit pattern, ``inv = float32(1 / amax) * qmax``
(torch's ``qmax / amax`` is reciprocal-then-multiply), ``x * inv`` rounded half-to-even (``torch.round``),
``scale = amax / qmax``; decode is ``float32(code) * scale`` rounded to the output dtype (bf16 and fp16
round-to-nearest-even, as torch's casts do). ``fastmath`` stays off so LLVM keeps every rounding step.

Geometry: the quantized part of a tensor is addressed as ``(u, h, t, i, k)`` at flat element offset
``base + u*su + h*sh + t*st + i*post + k`` with ``i`` the quantization axis (``n`` long, groups of ``group``)
and ``k`` the ``post`` trailing elements; row ``r = (u*H + h)*T + t`` indexes the ``[rows, padded, post]``
code layout and the ``[rows, G, post]`` scales. A plain tensor is ``U = H = 1``; the keys and values of a
KV chunk ``[A, 2, heads, tokens, d]`` are strided views of the one input array (see :func:`kv_parts`).

Dispatch (``available``): numba importable, a little-endian host, and ``QWEN3VL_CODEC_KERNELS`` not
``torch`` (outside the ``QWEN3VL_RAY_*`` option table on purpose: a debugging switch, not a setting) -- or
set :data:`ENABLED` to False (tests and benchmarks compare both paths). The codecs take this path for CPU,
contiguous bf16/fp16/fp32/fp64 tensors and fall back to the torch paths otherwise.

Threads: every core of the process's affinity mask (:data:`MAX_THREADS` caps it), OpenMP layer preferred,
one launch at a time (a lock), torch's own thread count restored after each launch, and serial twins in
a child forked after a launch. Kernels compile on first use per dtype (seconds) and are cached on disk
(``cache=True``, in ``__pycache__``); benchmarks warm up before timing.

``auto`` uses :func:`quantize_parts`' ``measure`` sums: the error of the decoded values, without a decode.

Digests (payload format version 2, see :mod:`codecs.base`): where each chunk's codes fill whole 16 KiB segments
(every default group; :func:`_kernel_hashes`), the encode kernel hashes them right after writing them and the
decode kernel as it reads them, on every kernel thread; the caller folds them into the payload's digest.
Measured on this 2-core host (two threads, wall clock, best of two runs against the previous build): encode of
a 36 MiB KV chunk 16-19 -> 22-24 GB/s, decode int8 / kv-int8 28-30 -> 30-36 GB/s; 2 MiB chunks encode 14-17 ->
15-21 GB/s, decode unchanged within noise (kv-int4 -7%). On one thread encode is unchanged but a 2 MiB chunk's
decode is 8-17% slower (~97-104 -> 106-121 us; CPU clock): the in-kernel hash of codes read from L3 costs ~15 us/MiB
against ~10-12 for the old serial pass, plus ~3-5 us of digest bookkeeping per payload. Hashing after the
launch instead when one thread runs measured slower still (a launch of its own).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from qwen3vl_ray.codecs import base as _base
from qwen3vl_ray.errors import CodecError

log = logging.getLogger(__name__)

try:  # numba is a dependency, but the torch paths stay complete without it
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

#: module switch: False forces the torch paths (tests and ``benchmarks.codecs --kernels torch``)
ENABLED = os.environ.get("QWEN3VL_CODEC_KERNELS", "fused").strip().lower() != "torch"
#: cap on kernel threads (None: every core in the process's affinity mask); benchmarks match it to torch's
MAX_THREADS: int | None = None
#: elements per prange chunk: big enough that per-chunk scratch and scheduling cost nothing, small enough
#: that a 2 MiB tensor still splits over every core
CHUNK_ELEMS = 1 << 15

if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    # OpenMP first: a parallel launch costs ~2 us there against ~30-50 us on workqueue (measured here), which
    # is most of the kernel time of a 2 MiB chunk. workqueue (always present)
    # is the fallback.
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


def _full_width_vectors() -> None:
    """Let LLVM vectorize with 512-bit registers on AVX-512 hosts, where its tuning for Intel server cores
    (``prefer-256-bit``) keeps loops at 256 bits to spare an old core's clock: on this Sapphire/Emerald Rapids
    host the per-channel loops of a KV chunk's keys then ran 8 lanes per instruction instead of 16 (encode
    ~97 -> 81 us, decode ~103 -> 84 us per 1 MiB of keys, one thread). numba's codegen is one per process, so
    this is numba's setting for the process, made only where the user made none (``NUMBA_CPU_FEATURES``) and
    taking effect only if nothing was compiled yet; the features otherwise stay the host's."""
    if numba is None or numba.config.CPU_FEATURES is not None:
        return
    from numba.core import codegen

    features = codegen.get_host_cpu_features()
    if "+avx512f" in features.split(","):
        numba.config.CPU_FEATURES = features + ",-prefer-256-bit"


_full_width_vectors()

# the workqueue layer aborts the process when two Python threads launch parallel kernels at once, and
# concurrent launches would only split the same cores: callers take turns
_LOCK = threading.Lock()
if numba is not None:
    from qwen3vl_ray.codecs import numba_cache_lock
    from qwen3vl_ray.codecs import fused_kernels as K  # noqa: E402  (after the threading layer is chosen)

    # before any kernel compiles: every process of a node saves its kernels into one cache directory
    numba_cache_lock.install()

# GNU OpenMP is not fork-safe: a child forked after this process launched a parallel kernel must not launch
# one (numba aborts it). Such a child runs the serial twins of the kernels instead.
_LAUNCH_PID: int | None = None

#: numpy dtypes the kernels read and write each torch dtype as (bf16 / fp16 differ by signedness only)
_LITTLE = sys.byteorder == "little"
_NP = {torch.bfloat16: (torch.uint16, np.uint16), torch.float16: (torch.int16, np.int16),
       torch.float32: (torch.float32, np.float32), torch.float64: (torch.float64, np.float64)}


def available(t: torch.Tensor | None = None) -> bool:
    """True when the fused kernels can take ``t`` (CPU, a float dtype they know); None asks about the host."""
    if not (ENABLED and numba is not None and _LITTLE):
        return False
    return t is None or (t.is_cpu and t.dtype in _NP)


def hashing_available() -> bool:
    """True when :func:`segment_digests` runs compiled (else callers hash segments from Python: same digests)."""
    return available()


def segment_digests(arr: np.ndarray, seg: int) -> np.ndarray:
    """xxh3_64 of each ``seg``-byte segment of the flat uint8 ``arr`` (the payload format's, see codecs.base),
    on every core."""
    out = np.empty(-(-arr.size // seg), dtype=np.uint64)
    with _LOCK, _Launches() as threads:
        _pieces(out.size, threads)
        _kernel("SEGMENTS", None)(arr, seg, out)
    return out


#: (when read, cores) of :func:`_threads`: the affinity mask is read again after :data:`AFFINITY_TTL` seconds
_AFFINITY: list = [-math.inf, 1]
AFFINITY_TTL = 1.0


def _threads() -> int:
    """The cores this process may run on (its affinity mask, read at most once per :data:`AFFINITY_TTL`: the
    system call and set cost ~1-3 us per launch, and a worker that binds its cores does so once), within
    numba's pool."""
    now = time.monotonic()
    if now - _AFFINITY[0] > AFFINITY_TTL:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            n = os.cpu_count() or 1
        _AFFINITY[:] = [now, n]
    n = _AFFINITY[1]
    return max(1, min(n, MAX_THREADS or n, numba.config.NUMBA_NUM_THREADS))


def as_bits(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU float tensor as the flat numpy array the kernels take (bf16 -> uint16, fp16 -> int16)."""
    view_dt, _ = _NP[t.dtype]
    return (t.view(view_dt) if view_dt != t.dtype else t).numpy().reshape(-1)


@dataclass(slots=True, frozen=True)
class Geometry:
    """Where the quantized part sits in the flat input/output array (see the module docstring)."""

    base: int
    U: int
    su: int
    H: int
    sh: int
    T: int
    st: int
    n: int
    post: int
    group: int

    #: derived once (a codec keeps its geometries per layout): the kernels' integer arguments, groups per
    #: parallel chunk, chunks, scales, and codes before int4 packing
    dims: tuple = field(init=False, repr=False, compare=False)
    per: int = field(init=False, repr=False, compare=False)
    nchunks: int = field(init=False, repr=False, compare=False)
    nscales: int = field(init=False, repr=False, compare=False)
    count: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        fields = (self.base, self.U, self.su, self.H, self.sh, self.T, self.st, self.n, self.post, self.group)
        if not all(isinstance(v, int) for v in fields):  # numpy integers would be other kernel signatures
            fields = tuple(int(v) for v in fields)
        rows = self.U * self.H * self.T * -(-self.n // self.group)
        per = max(1, CHUNK_ELEMS // max(1, self.group * self.post))
        per += per % 2  # even, so int4 chunks start on a byte
        for name, value in (("dims", fields), ("per", per), ("nchunks", -(-rows // per)),
                            ("nscales", rows * self.post), ("count", rows * self.post * self.group)):
            object.__setattr__(self, name, value)

    @classmethod
    def plain(cls, pre: int, n: int, post: int, group: int) -> "Geometry":
        return cls(0, 1, 0, 1, 0, pre, n * post, n, post, group)


def kv_parts(shape: list[int] | tuple[int, ...], cut: int, group: int, vgroup: int | None = None) -> tuple[Geometry, Geometry]:
    """Keys (groups of tokens per channel) and values (groups of head_dim per token) of ``[..., 2, H, T, D]``;
    ``vgroup`` (default ``group``) is the values' group when a payload recorded a different one."""
    vgroup = group if vgroup is None else vgroup
    *lead, two, heads, tokens, d = shape
    a = int(np.prod(lead, dtype=np.int64)) if lead else 1
    su, sh = 2 * heads * tokens * d, tokens * d
    keys = Geometry(0, a, su, heads, sh, 1, 0, cut, d, max(1, min(group, cut)))
    values = Geometry(heads * tokens * d, a, su, heads, sh, cut, d, d, 1, max(1, min(vgroup, d)))
    return keys, values


_SERIAL: dict[tuple, object] = {}


class _Launches:
    """Threads for the launches inside (the caller holds :data:`_LOCK`); ``with`` gives their count.

    numba's OpenMP layer sets the calling thread's OpenMP thread count, which torch's intra-op pool shares
    (one libgomp): torch's setting is put back afterwards. One setup serves every part of a payload (a KV
    chunk's keys and values): on a 2 MiB chunk each costs a few percent of the encode. numba keeps its count
    per thread; it is set again only when it changes (~1.2 us a call). A class, not a generator: ~1 us less
    per payload.
    """

    __slots__ = ("torch_threads",)

    def __enter__(self) -> int:
        self.torch_threads = torch.get_num_threads()
        # no more threads than torch's intra-op pool: that is what the process was given (a vLLM worker binds
        # its cores and then refuses torch.set_num_threads, so a wider numba launch would stay wider for good)
        threads = min(_threads(), self.torch_threads)
        if getattr(_NUMBA_SET, "threads", None) != threads:
            numba.set_num_threads(threads)
            _NUMBA_SET.threads = threads
        return threads

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)


def _pieces(nchunks: int, threads: int) -> None:
    """Dynamic scheduling in ~8 pieces per thread: on a shared host a static split waits for the thread whose
    core another process holds; pieces let the other threads take over. numba keeps the size per thread; it is
    set again only when it changes (~1 us a call, more right after a launch; a KV chunk's keys and values
    have the same number of chunks)."""
    size = max(1, nchunks // (8 * threads))
    if getattr(_NUMBA_SET, "size", None) != size:
        numba.set_parallel_chunksize(size)
        _NUMBA_SET.size = size


#: what :class:`_Launches` and :func:`_pieces` last set on each thread (numba keeps both per thread): its thread
#: count (``threads``) and parallel chunk size (``size``). Code elsewhere in the process that sets either on
#: the same thread leaves these stale; that changes how the work is scheduled, never its results.
_NUMBA_SET = threading.local()


#: layouts kept per codec module (:func:`remember`): at most this many, oldest out first
LAYOUTS_KEPT = 256


def remember(table: dict, key, value):
    """Keep ``value`` under ``key`` in a per-layout table of at most :data:`LAYOUTS_KEPT` entries (the oldest goes
    first) and return it: the codecs keep each shape's geometry, buffer lengths and header this way."""
    return _base.remember(table, key, value, LAYOUTS_KEPT)


def _kernel(table: str, flags: tuple):
    """The parallel kernel ``K.<table>[flags]``, or in a child forked after this process launched one, its serial
    twin (compiled on first use there: numba's cache would mix the two up, as both come from one function)."""
    global _LAUNCH_PID
    pid = os.getpid()
    if _LAUNCH_PID is None:
        _LAUNCH_PID = pid
    kernel = getattr(K, table)[flags] if flags is not None else getattr(K, table)
    if pid == _LAUNCH_PID:
        return kernel
    if (table, flags) not in _SERIAL:
        log.info("fused codec kernels: forked child of a process that ran them; running them on one thread")
        _SERIAL[table, flags] = numba.njit(parallel=False, fastmath=False, cache=False, nogil=True)(kernel.py_func)
    return _SERIAL[table, flags]


_NO_DIGESTS = np.zeros(0, dtype=np.uint64)


#: how many of the kernel's sums each ``measure`` fills
_WIDTH = (0, 2, 3, 3, 3, 3)
#: the kernels' upper bounds of the error (see :func:`bound_error`), cheapest and loosest first, and the
#: ``measure`` of :func:`quantize_parts` that takes each: ``amax`` the norm's lower bound from each row group's
#: largest input alone (read back from its scale: no work in the group's loop) and, along a channel, from the
#: larger of each two inputs; ``cheap`` also from the largest of each four in a row's group; ``full`` from every
#: input's square; ``steps`` also the codes' rounding steps exactly instead of half a step each
BOUNDS = {"amax": 5, "cheap": 3, "full": 2, "steps": 4}


def bound_measure(bound: str, codec: str) -> int:
    """The kernels' ``measure`` that takes ``bound`` (a key of :data:`BOUNDS`), for ``codec``'s
    ``encode_bounded``; a :class:`CodecError` naming the choices for any other."""
    try:
        return BOUNDS[bound]
    except (KeyError, TypeError):
        raise CodecError(f"codec {codec!r}: unknown error bound {bound!r}; one of {', '.join(BOUNDS)}") from None


def _kernel_hashes(g: Geometry, pack4: bool, ncodes: int) -> bool:
    """True when each kernel chunk's codes fill whole :data:`SEGMENT`s, so the kernel hashes them (else the payload
    writer hashes the buffer after the launch). Default groups always fill them."""
    gsize = g.group * g.post
    chunk = g.per * gsize // 2 if pack4 else g.per * gsize
    return bool(ncodes) and chunk % _base.SEGMENT == 0


def _ncodes(g: Geometry, pack4: bool) -> int:
    return (g.count + 1) // 2 if pack4 else g.count


def error_bound(e2: float, x2: float, numel: int, dtype: torch.dtype) -> float:
    """``relative_error(x, decode(payload))`` from :func:`quantize_parts`' sums, rounded up by 2^-20 (~1e-6): the
    sums are float32 per group, scaled by ``1 / inv`` (within ~1e-7 of the stored scale), and float64
    inputs enter as float32. Never 0 for a lossy result, so a zero budget only takes lossless codecs."""
    if x2 == 0.0:
        return 0.0 if e2 == 0.0 else math.inf
    return math.sqrt(e2 / x2) + 2.0 ** -20


#: unit roundoff of the decoded values' store from float32, and half the smallest subnormal (the most an
#: element can lose to underflow), per output dtype
_STORE = {torch.bfloat16: (2.0 ** -8, 2.0 ** -134), torch.float16: (2.0 ** -11, 2.0 ** -25),
          torch.float32: (0.0, 0.0), torch.float64: (0.0, 0.0)}


@functools.lru_cache(maxsize=256)
def _bound_terms(numel: int, dtype: torch.dtype) -> tuple[float, float, float, float, float]:
    """:func:`bound_error`'s terms that depend on the tensor kind alone (kept: ~0.1 us warm of a remembered
    ``auto`` winner's Python per payload): ``(x_in, u1, abs_, B * abs_, B (1 + x_in))``, see there."""
    x_in = 2.0 ** -24 if dtype == torch.float64 else 0.0  # float64 inputs rounded to float32
    u, sub = _STORE.get(dtype, (2.0 ** -8, 2.0 ** -25))
    u1 = u + 2.0 ** -23  # the store, and code * scale's float32 rounding
    abs_ = math.sqrt(numel) * (sub + 2.0 ** -147)  # subnormal stores, float32 underflow of inputs and products
    # ||x_q - d|| <= 2 x_in ||f|| + ||f - q scale|| + u1 ||q scale|| + abs_, with ||f - q scale|| <= steps +
    # 2^-20 ||f|| (y's and scale's rounding) and ||q scale|| <= ||f|| + ||f - q scale||: A + B ||f||, A =
    # steps (1 + u1) + abs_
    b = 2 * x_in + 2.0 ** -20 * (1 + u1) + u1
    # ||f|| <= (1 + x_in) ||x_q|| + abs_ (float64 inputs round up to 2^-24 relative, or by underflow), and
    # ||x_q|| <= ||x||: A += B abs_, B *= 1 + x_in
    return x_in, u1, abs_, b * abs_, b * (1 + x_in)


def bound_error(sums: tuple[float, float, float], numel: int, dtype: torch.dtype, exact_x2: float = 0.0,
                exact_steps: bool = False) -> float:
    """An upper bound of ``relative_error(x, decode(payload))`` from :func:`quantize_parts`' ``measure`` 2 to
    5 sums (:data:`BOUNDS`): ``sq`` (group size x ``scale^2`` summed over the quantized groups; ``exact_steps``,
    ``measure`` 4: the squared steps themselves, ``scale^2 (x * inv - code)^2`` summed), ``f2_lo`` (a lower
    bound of the squared norm of the quantized groups' float32 inputs) and ``zz`` (a bound of the squared error
    of the groups stored as zeros: their inputs, each at most ``amax = qmax * scale``); ``exact_x2`` is the
    squared norm of inputs stored exactly (a KV residual window). ``inf`` where it cannot bound (an overflowing
    sum, a zero norm bound).

    Per quantized element, ``x - decoded`` is the code's rounding step (at most half a step: ``scale / 2``) plus
    float32 rounding of ``x * inv``, of ``scale`` against ``1 / inv`` and of ``code * scale`` (each within 2^-24
    relative), the store to the output dtype (unit roundoff ``u``: 2^-8 bf16, 2^-11 fp16, 0 fp32 / fp64, plus
    half a subnormal per element) and, for float64 inputs, their rounding to float32 ``f``. By the triangle
    inequality on the vectors, ``||x_q - d|| <= A + B ||f||`` with ``A`` the steps (``sqrt(sq) / 2``) and the
    subnormal terms and ``B`` the relative ones (``u`` and the 2^-2x roundings). Dividing by ``||x||``, which is
    at least ``||f||`` (within the float64 rounding) and at least ``X``, the norm's lower bound: the relative
    error is at most ``sqrt((A / X + B)^2 + zz / X^2)``. Only a lower bound of the norm is needed, which is
    what lets the kernels take it cheaply: ``measure`` 3 squares only the largest of each two inputs along a
    channel or four in a row's group (which the amax loops find anyway, see ``fused_kernels.ENCODE``),
    ~1.0-1.3x below the norm on KV chunks and vision features.
    Half a step per element is what a code can lose at most; uniform rounding loses ``1/sqrt(12)`` of a step on
    average, so the full bound sits ~1.7-2.5x above the true error (the cheap one ~2.0-2.9x), plus ``u`` (~0.4%
    for bf16): it proves a budget with room to spare. The steps bound (``measure`` 4) sums the steps exactly and
    keeps only the store's worst case, ``u``: 1.1-1.8x the true error on bf16 (the most where the error is
    smallest, ``u`` being absolute), for ~60% of an exact measure's cost; :func:`error_bound`'s exact sums
    decide the closest calls.
    """
    sq, f2_lo, zz = sums
    if not all(map(math.isfinite, (sq, f2_lo, zz, exact_x2))):
        return math.inf
    x_in, u1, abs_, b_abs, b = _bound_terms(numel, dtype)
    # half a step per element (1/inv within 2^-22 of scale), or the steps summed exactly (``steps``: the sum is
    # of ``x * inv - code`` times the scale, and x * inv within ~2^-21 of x / scale: the 2^-20 ||f|| below)
    steps = (math.sqrt(sq) if exact_steps else 0.5 * math.sqrt(sq)) * (1 + 2.0 ** -20)
    a = steps * (1 + u1) + abs_ + b_abs
    x_lo = max(0.0, (math.sqrt(max(f2_lo, 0.0)) - abs_) * (1 - 2 * x_in))
    x2 = x_lo * x_lo + exact_x2 * (1 - 2.0 ** -40)
    if x2 == 0.0:
        return 0.0 if zz == 0.0 and sq == 0.0 else math.inf
    lo = math.sqrt(x2) * (1 - 2.0 ** -40)
    return math.sqrt((a / lo + b) ** 2 + zz * (1 + 2.0 ** -40) / (lo * lo)) * (1 + 2.0 ** -30) + 2.0 ** -30


def _bound_sums(g: Geometry, qmax: int, lanes: float, q2: float, z2: float,
                exact_steps: bool = False) -> tuple[float, float, float]:
    """:func:`bound_error`'s ``(sq, f2_lo, zz)`` of one part from the kernel's ``measure`` 2 to 5 sums
    ``lanes, q2, z2``: every group holds at most ``group`` elements per scale (``sq = group * q2``); a group
    stored as zeros (amax <= TINY) errs by its inputs, each <= amax = qmax * scale (within 2^-23); the lanes'
    float32 sums (squares of inputs, or of some of them) are rounded down by their worst case: a lane sums at
    most one term per group of a kernel chunk (a position in a row's group) or per row of them (a channel).

    ``exact_steps`` (``measure`` 4): ``q2`` is already the squared steps, ``sum(scale^2 * (y - code)^2)``, each
    group's float32 sum of at most ``group`` exact differences' squares rounded up by its worst case, the
    float64 products and sums by 2^-20 (2^33 terms at 2^-53 each)."""
    gam = (g.per * (g.group if g.post > 1 else 1) + 3) * 2.0 ** -24
    gam /= 1 - gam
    if exact_steps:
        gs = (g.group + 2) * 2.0 ** -24
        sq = q2 * (1 + gs / (1 - gs)) * (1 + 2.0 ** -20)
    else:
        sq = g.group * q2
    return sq, lanes / (1 + gam) * (1 - 2.0 ** -40), g.group * z2 * (qmax * (1 + 2.0 ** -22)) ** 2


class _Plan:
    """What an encode and a decode plan share: each part's launch -- kernel flags, integer arguments, chunks,
    the range of its codes' digests in the payload's :class:`base.SegmentDigests` (None where the kernel does
    not hash them, see :func:`_kernel_hashes`) and of its scales' -- and the :data:`CHUNK_ELEMS` and
    :data:`base.SEGMENT` they were derived under."""

    __slots__ = ("parts", "pack4", "launches", "chunk", "segment")

    def __init__(self, parts: list[Geometry], pack4: bool, digest_spans: tuple[tuple[int, int], ...]):
        self.parts, self.pack4 = parts, pack4
        self.chunk, self.segment = CHUNK_ELEMS, _base.SEGMENT
        self.launches = [((g.post == 1, pack4), g.dims, g.per, g.nchunks,
                          digest_spans[2 * i] if _kernel_hashes(g, pack4, _ncodes(g, pack4)) else None,
                          digest_spans[2 * i + 1], g) for i, g in enumerate(parts)]

    def fresh(self) -> bool:
        """False once the tests changed :data:`CHUNK_ELEMS` or :data:`base.SEGMENT` since it was derived."""
        return self.chunk == CHUNK_ELEMS and self.segment == _base.SEGMENT


class EncodePlan(_Plan):
    """A payload layout's fused encode, derived once per layout (codecs keep one per shape, dtype and parameters,
    see :func:`remember`): its :class:`base.PayloadLayout` (where each part's codes and scales sit in the
    payload) and each part's launch. Why: an entry of a known kind then costs a handful of Python steps around
    its kernels, not a per-part rebuild of views, digest arrays and checks (~20 us warm on a 2 MiB KV chunk, more
    right after a launch)."""

    __slots__ = ("layout",)

    def __init__(self, parts: list[Geometry], pack4: bool, layout: _base.PayloadLayout):
        for i, g in enumerate(parts):
            (c0, c1), (s0, s1) = layout.spans[2 * i: 2 * i + 2]
            if (c1 - c0, s1 - s0) != (_ncodes(g, pack4), 4 * g.nscales):
                raise AssertionError(f"payload buffers {c1 - c0}/{s1 - s0} B do not fit {g}")
        super().__init__(parts, pack4, layout.digest_spans)
        self.layout = layout


def quantize_parts(x: np.ndarray, plan: EncodePlan, qmax: int, writer: _base.PayloadWriter, codec: str,
                   measure: int = 0) -> tuple[float, ...]:
    """Quantize each part of ``plan`` of ``x`` (flat, :func:`as_bits`'s dtype) into the payload ``writer`` (built
    on ``plan.layout``): codes (int8, or packed int4 pairs) and float32 scales straight into its bytes, their
    segment digests into its :class:`base.SegmentDigests`, hashed by the kernels as they write them (the codes
    where each chunk's fill whole segments, see :func:`_kernel_hashes`). The kernels write the scales unaligned
    (float32 stores at any offset), hash them, and count those that are not finite (a NaN or inf input): the
    tensor is then refused.

    ``measure`` 1: returns (squared error of the decoded values, squared norm), summed while each group is in
    cache (what ``auto`` needs, without a decode; see :func:`error_bound`): float32 sums in code units per group
    (``(x - decoded) * inv`` and ``x * inv``, the decoded value rounded to the output dtype as decode rounds
    it), scaled back by ``1 / inv^2`` in float64; groups stored as zeros add their inputs' squares exactly.
    ``measure`` 2, 3 and 5: :func:`bound_error`'s sums, its norm bound from every input's square (2) or, cheaper
    and looser, from some inputs' (3: the largest of each two or four; 5: in a row's group only the largest, see
    ``fused_kernels.ENCODE``); ``measure`` 4: as 2 with the codes' squared rounding steps exactly, each group's
    scaled by its squared scale, instead of the squared scales (``BOUNDS``). Else ().
    """
    if writer.layout is not plan.layout:
        raise AssertionError("the payload writer was not built on the plan's layout")
    arr, digs, hashed = writer.array, writer.digests.array, writer.digests.hashed
    spans = plan.layout.spans
    measure = int(measure)
    q, seg = np.float32(qmax), _base.SEGMENT
    s0 = s1 = s2 = 0.0
    with _LOCK, _Launches() as threads:  # one thread setup for every part
        for i, (flags, dims, per, nchunks, cd, (d0, d1), g) in enumerate(plan.launches):
            (c0, c1), (b0, b1) = spans[2 * i], spans[2 * i + 1]
            _pieces(nchunks, threads)
            bad, a, b, c = _kernel("ENCODE", (*flags, measure))(
                x, *dims, q, per, arr[c0:c1], arr[b0:b1], seg, _NO_DIGESTS if cd is None else digs[cd[0]:cd[1]],
                digs[d0:d1])
            if bad:
                raise CodecError(f"codec {codec!r} cannot encode NaN or inf values; use 'none', 'bf16', 'fp16' or 'zstd'")
            hashed[2 * i] = cd is not None
            hashed[2 * i + 1] = True
            if measure >= 2:
                a, b, c = _bound_sums(g, qmax, a, b, c, exact_steps=measure == 4)
            s0 += a
            s1 += b
            s2 += c
    return (s0, s1, s2)[:_WIDTH[measure]]


class DecodePlan(_Plan):
    """A payload layout's fused decode, derived once per layout (codecs keep one per recorded groups and buffer
    lengths): each part's launch, once the buffer lengths were checked against the parts (a corrupt payload's
    differ: the kernels must never read past a buffer), and where every buffer's digests sit in the payload's
    :class:`base.SegmentDigests`. Why: as :class:`EncodePlan`."""

    __slots__ = ("lengths", "digest_spans", "nseg")

    def __init__(self, parts: list[Geometry], pack4: bool, lengths: tuple[int, ...], codec: str):
        for i, g in enumerate(parts):
            need = (_ncodes(g, pack4), 4 * g.nscales)
            if tuple(lengths[2 * i: 2 * i + 2]) != need:
                raise CodecError(f"corrupt {codec!r} payload: buffers of {list(lengths[2 * i: 2 * i + 2])} bytes, "
                                 f"layout needs {list(need)}")
        self.lengths = lengths
        self.digest_spans, self.nseg = _base.digest_spans(lengths)
        super().__init__(parts, pack4, self.digest_spans)


_EMPTY = np.zeros(0, np.uint8)


def dequantize_parts(out: np.ndarray, plan: DecodePlan, buffers, digests: _base.SegmentDigests | None = None) -> None:
    """Inverse of :func:`quantize_parts` into ``out`` (flat, :func:`as_bits`'s dtype), from a payload whose buffer
    lengths are ``plan.lengths`` (callers key their plans by them). ``digests`` (built on ``plan.digest_spans``):
    the kernels hash the codes as they read them where they can (see :func:`_kernel_hashes`), and the scales, for
    the caller to check the payload's digest."""
    seg = _base.SEGMENT
    arr = digests.array if digests is not None else None
    with _LOCK, _Launches() as threads:  # one thread setup for every part
        for i, (flags, dims, per, nchunks, cd, (d0, d1), _) in enumerate(plan.launches):
            codes = np.frombuffer(buffers[2 * i], dtype=np.uint8) if plan.lengths[2 * i] else _EMPTY
            scales = np.frombuffer(buffers[2 * i + 1], dtype=np.uint8) if plan.lengths[2 * i + 1] else _EMPTY
            _pieces(nchunks, threads)
            _kernel("DECODE", flags)(out, *dims, per, codes, scales, seg,
                                     _NO_DIGESTS if arr is None or cd is None else arr[cd[0]:cd[1]],
                                     _NO_DIGESTS if arr is None else arr[d0:d1])
            if digests is not None:
                digests.hashed[2 * i] = cd is not None
                digests.hashed[2 * i + 1] = True
