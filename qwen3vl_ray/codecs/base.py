"""Codec interface and the self-describing payload format shared by every codec.

A payload is one contiguous byte buffer, never pickle::

    magic "QVC1" | u16 format version | u8 len + codec name | u16 codec version
    | u32 len + JSON meta (dtype, shape, params, ...) | u16 n buffers | n x u64 buffer lengths
    | u64 digest | buffers...

The digest (format version 2) is xxh3_64 of the header followed by the xxh3_64 (u64 little-endian) of each
:data:`SEGMENT`-byte segment of each buffer in order (a buffer's last segment may be shorter). Why segments: the
fused kernels hash each segment of codes as they write (or read) it, on every core, while it is in cache; one
xxh3 over the whole payload was a serial pass that did not scale with the worker's cores and re-read an 18 MiB
payload from DRAM (~0.5 ms of a 36 MiB KV chunk's ~1.9 ms encode on two cores). Version 1 payloads (one xxh3_64
over the header and every buffer) are still read.

so ``decode`` can dispatch on the codec name, reject unknown versions, and detect truncation or corruption
before it produces a tensor. Codecs register themselves with :func:`register_codec`; ``make_codec`` builds
one from a spec string such as ``"int8"`` or ``"int4:group=64"`` or ``"int8+zstd"``.
"""

from __future__ import annotations

import copy
import ctypes
import inspect
import json
import math
import os
import struct
import sys
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

import numpy as np
import torch
import xxhash

from qwen3vl_ray.errors import CodecError

MAGIC = b"QVC1"
#: the format version new payloads are written in; :data:`READ_VERSIONS` are the ones ``decode`` reads
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
#: bytes per hashed segment of a buffer (format version 2): 16 KiB, what one fused-kernel chunk of int4 codes
#: fills (int8 chunks fill two), small enough to hash from L1/L2 right after it was written
SEGMENT = 1 << 14
#: payloads whose buffers span at most this many segments are hashed from Python, with no kernel launch
SERIAL_SEGMENTS = 8
_HEAD = struct.Struct("<4sH")

Buffer = bytes | bytearray | memoryview | np.ndarray

# torch dtypes without a numpy twin travel as a same-size integer view.
_VIEW_AS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CodecError(f"unknown dtype {name!r} in payload")
    return dt


def tensor_array(t: torch.Tensor) -> np.ndarray:
    """A CPU, contiguous numpy view of ``t`` with its shape (copies only when it must); dtypes without a numpy
    twin (bf16, fp8) come back as a same-size integer view."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype in _VIEW_AS:
        t = t.view(_VIEW_AS[t.dtype])
    return t.numpy()


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A CPU, contiguous tensor's bytes as a flat uint8 numpy view (copies only when it must)."""
    return tensor_array(t).reshape(-1).view(np.uint8)


def tensor_from_bytes(buf: Buffer, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`tensor_bytes`; the result owns a copy (payload buffers may be read-only)."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    if raw.size != n:
        raise CodecError(f"payload holds {raw.size} bytes, {dtype} {tuple(shape)} needs {n}")
    # numpy asks for transparent huge pages on large buffers, torch does not: first-touch faults on a fresh
    # 36 MiB torch buffer cost several memcpys of it (see codecs.blocked.empty)
    out = torch.from_numpy(np.empty(n, dtype=np.uint8)).view(dtype).view(tuple(shape)) if n >= 1 << 22 else torch.empty(tuple(shape), dtype=dtype)
    out_u8 = out.view(_VIEW_AS.get(dtype, dtype)).numpy().reshape(-1).view(np.uint8) if n else None
    if n:
        out_u8[:] = raw
    return out


def payload_header(name: str, version: int, meta: dict[str, Any], lengths: Sequence[int]) -> bytes:
    """The header bytes a payload of these buffers starts with (up to its digest); see :class:`PayloadWriter`."""
    return _header(name, version, meta, lengths)


def _header(name: str, version: int, meta: dict[str, Any], lengths: Sequence[int]) -> bytes:
    name_b = name.encode()
    meta_b = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    header = bytearray(_HEAD.pack(MAGIC, FORMAT_VERSION))
    header += struct.pack("<B", len(name_b)) + name_b + struct.pack("<H", version)
    header += struct.pack("<I", len(meta_b)) + meta_b
    header += struct.pack("<H", len(lengths)) + b"".join(struct.pack("<Q", n) for n in lengths)
    return bytes(header)


#: payloads at least this large skip bytearray's zero-fill (every codec writes every byte of its payload:
#: the header, the digest and each buffer; tests/test_codecs_fused.py and _blocked.py check with garbage)
UNINIT_MIN = 1 << 16
#: payloads at least this large ask for transparent huge pages before their first touch
HUGEPAGE_MIN = 1 << 22
_MADV_HUGEPAGE = 14
#: glibc ``mallopt`` settings applied on import (``QWEN3VL_CODEC_MALLOC=default`` leaves malloc alone):
#: blocks under 32 MiB from the heap and up to 64 MiB of freed heap kept for reuse -- the state glibc's
#: dynamic thresholds reach by themselves once a 32 MiB block was freed, taken from the start. Why: before
#: that, glibc hands a freed 1 MiB payload's pages back to the kernel (munmap, or a heap trim once 2 MiB are
#: free at its top), so the next payload of a 2 MiB KV chunk faults in 256 fresh zeroed pages: ~350 us here
#: (a VM), five times the chunk's memcpy and more than its quantization. Reused heap memory costs nothing.
#: (A 4 MiB mmap threshold measured ~1.4 ms of faults on every 18 MiB payload of a 36 MiB chunk.)
MALLOC_MMAP_THRESHOLD = 1 << 25
MALLOC_TRIM_THRESHOLD = 1 << 26
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
try:
    _bytearray_uninit = ctypes.pythonapi.PyByteArray_FromStringAndSize
    _bytearray_uninit.restype = ctypes.py_object
    _bytearray_uninit.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t]
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
    if _libc is not None:
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (AttributeError, OSError):  # pragma: no cover - non-CPython or no libc: plain bytearrays
    _bytearray_uninit, _libc = None, None


def tune_malloc() -> bool:
    """Apply :data:`MALLOC_MMAP_THRESHOLD` / :data:`MALLOC_TRIM_THRESHOLD` (glibc only); True if applied."""
    if _libc is None or os.environ.get("QWEN3VL_CODEC_MALLOC", "").strip().lower() == "default":
        return False
    try:
        mallopt = _libc.mallopt
    except AttributeError:  # pragma: no cover - a libc without mallopt (musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


MALLOC_TUNED = tune_malloc()


def alloc_payload(n: int) -> bytearray:
    """A bytearray of ``n`` bytes whose every byte the caller will write.

    Why: ``bytearray(n)`` memsets, and on fresh 4 KiB pages that pass costs as much as quantizing (18 MiB:
    ~12 ms here); the C API's uninitialized bytearray plus ``madvise(MADV_HUGEPAGE)`` before first touch
    costs ~4 ms and lets the codec's own writes fault the pages in. Small payloads keep ``bytearray(n)``;
    mid-size ones come from reused heap memory (:func:`tune_malloc`) and skip the memset.
    """
    if n < UNINIT_MIN or _bytearray_uninit is None:
        return bytearray(n)
    out = _bytearray_uninit(None, n)
    if _libc is not None and n >= HUGEPAGE_MIN:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(out))
        lo, hi = (addr + (1 << 21) - 1) & ~((1 << 21) - 1), (addr + n) & ~((1 << 21) - 1)
        if hi > lo:
            _libc.madvise(lo, hi - lo, _MADV_HUGEPAGE)  # advisory: a refusal just leaves 4 KiB pages
    return out


def segment_digests(buf: Buffer) -> np.ndarray | bytes:
    """xxh3_64 of each :data:`SEGMENT`-byte segment of ``buf`` (uint64 little-endian: an array, or their bytes for
    a buffer of a few segments, hashed from Python without a kernel launch), on every core for large buffers."""
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    arr = arr.reshape(-1).view(np.uint8)
    n = arr.size
    if n <= SEGMENT:
        return _U64.pack(xxhash.xxh3_64_intdigest(arr)) if n else b""
    if n > SERIAL_SEGMENTS * SEGMENT:
        from qwen3vl_ray.codecs import fused  # lazy: fused imports numba

        if fused.hashing_available():
            return fused.segment_digests(arr, SEGMENT)
    return b"".join(_U64.pack(xxhash.xxh3_64_intdigest(arr[i: i + SEGMENT])) for i in range(0, n, SEGMENT))


_U64 = struct.Struct("<Q")


def digest_spans(lengths: Sequence[int]) -> tuple[tuple[tuple[int, int], ...], int]:
    """(each buffer's range in one array of every segment digest of a payload with these buffer lengths, its size)."""
    spans, nseg = [], 0
    for n in lengths:
        k = -(-n // SEGMENT)
        spans.append((nseg, nseg + k))
        nseg += k
    return tuple(spans), nseg


class SegmentDigests:
    """One payload's segment digests: every buffer's in one uint64 little-endian ``array``, buffer i's at
    ``spans[i]`` (see :func:`digest_spans`); ``hashed[i]`` once they are in (a fused kernel took them as it wrote
    or read the buffer). Format version 2's digest hashes the header, then this array: each buffer's digests in
    order, the concatenation a stream over them would hash."""

    __slots__ = ("array", "spans", "hashed")

    def __init__(self, spans: tuple[tuple[int, int], ...], nseg: int):
        self.array = np.empty(nseg, dtype="<u8")
        self.spans = spans
        self.hashed = [False] * len(spans)

    @classmethod
    def of(cls, buffers: Sequence[Buffer]) -> "SegmentDigests":
        return cls(*digest_spans([memoryview(b).nbytes for b in buffers]))

    def digest(self, header: Buffer, buffers: Sequence[Buffer]) -> int:
        """The payload digest: the buffers not hashed yet are hashed here (:func:`segment_digests`)."""
        d = self.array
        for (lo, hi), done, buf in zip(self.spans, self.hashed, buffers):
            if hi > lo and not done:
                got = segment_digests(buf)
                d[lo:hi] = np.frombuffer(got, dtype="<u8") if isinstance(got, bytes) else got
        h = xxhash.xxh3_64(header)
        h.update(d)
        return h.intdigest()


class PayloadLayout:
    """Where a payload of known header and buffer lengths keeps each buffer (``spans``: byte ranges) and each
    buffer's segment digests (``digest_spans``: ranges of one array of every segment's digest, ``nseg`` long),
    for the :data:`SEGMENT` it was derived under. Codecs keep one per tensor layout (shape, dtype, parameters):
    a payload of a known kind is then filled with a few Python steps (see :class:`PayloadWriter`)."""

    __slots__ = ("header", "lengths", "size", "spans", "digest_spans", "nseg", "segment")

    def __init__(self, header: bytes, lengths: Sequence[int]):
        self.header = header
        self.lengths = tuple(lengths)
        self.segment = SEGMENT
        spans, pos = [], len(header) + 8
        for n in self.lengths:
            spans.append((pos, pos + n))
            pos += n
        self.size, self.spans = pos, tuple(spans)
        self.digest_spans, self.nseg = digest_spans(self.lengths)


class PayloadWriter:
    """A payload whose buffer sizes are known up front, filled in place (no build-then-copy).

    The codec writes each of ``buffers`` (writable memoryviews into the final bytearray), or the same bytes
    through :attr:`array`; a codec that hashed a buffer's segments as it wrote them (the fused kernels) puts them
    in :attr:`digests` (see :class:`SegmentDigests`); :meth:`finish` hashes the other buffers and stores the
    digest. The byte layout is exactly :func:`pack_payload`'s.
    """

    __slots__ = ("layout", "_out", "array", "buffers", "digests")

    def __init__(self, name: str, version: int, meta: dict[str, Any] | None, lengths: Sequence[int],
                 header: bytes | None = None):
        """``header``: :func:`payload_header`'s bytes for these arguments, when the caller keeps them; ``meta`` is
        then unused. A caller that keeps a :class:`PayloadLayout` per tensor layout uses :meth:`of`."""
        self._fill(PayloadLayout(_header(name, version, meta, lengths) if header is None else header, lengths))

    @classmethod
    def of(cls, layout: PayloadLayout) -> "PayloadWriter":
        """A payload of ``layout`` (derived under the current :data:`SEGMENT`)."""
        writer = cls.__new__(cls)
        writer._fill(layout)
        return writer

    def _fill(self, layout: PayloadLayout) -> None:
        self.layout = layout
        # uninitialized: the header, digest and every buffer byte are written before finish()
        self._out = out = alloc_payload(layout.size)
        out[: len(layout.header)] = layout.header
        #: the whole payload as flat uint8 (the fused kernels write their buffers through slices of it)
        self.array = np.frombuffer(out, dtype=np.uint8)
        mv = memoryview(out)
        self.buffers: list[memoryview] = [mv[a:b] for a, b in layout.spans]
        self.digests = SegmentDigests(layout.digest_spans, layout.nseg)

    def finish(self) -> bytearray:
        """Store the checksum and hand over the payload."""
        header = self.layout.header
        _U64.pack_into(self._out, len(header), self.digests.digest(header, self.buffers))
        # views die with the codec's last tensor over them; the bytearray is then resizable
        self.buffers, self.array = [], None
        return self._out


def pack_payload(name: str, version: int, meta: dict[str, Any], buffers: Sequence[Buffer]) -> bytearray:
    views = [memoryview(b).cast("B") if not isinstance(b, np.ndarray) else memoryview(np.ascontiguousarray(b).view(np.uint8).reshape(-1)) for b in buffers]
    w = PayloadWriter(name, version, meta, [v.nbytes for v in views])
    for dst, v in zip(w.buffers, views):
        dst[:] = v
    return w.finish()


def unpack_payload(payload: Buffer, verify: bool = True) -> tuple[str, int, dict[str, Any], list[memoryview]]:
    """Parse and verify a payload. Raises :class:`CodecError` on anything malformed.

    ``verify=False`` (format version 2 only; version 1 is always verified here) leaves the digest to the caller:
    see :func:`check_digest` (the fused decode hashes the codes as it reads them)."""
    name, version, meta, bufs = _unpack(payload, verify)[:4]
    return name, version, copy.deepcopy(meta), bufs  # the caller's own: the decoders share the parsed one


def _no_constant(name: str):
    """``json``'s hook for ``Infinity``/``NaN``: no codec writes them, so a header holding one is corrupt."""
    raise CodecError(f"corrupt payload header: {name} where a number belongs")


def remember(table: dict, key, value, kept: int = 256):
    """Keep ``value`` under ``key`` in a cache of at most ``kept`` entries (the oldest goes first) and return
    it. Tiers encode and decode from several threads: the eviction takes a lock (a miss is rare; a hit reads the
    dict without one)."""
    with _REMEMBER_LOCK:
        if len(table) >= kept:
            table.pop(next(iter(table)))
        table[key] = value
    return value


_REMEMBER_LOCK = threading.Lock()
#: parsed headers by their bytes, up to the digest: (codec name, codec version, meta, buffer lengths). Entries of
#: one kind repeat their header, and parsing one cost ~3-10 us of a 2 MiB chunk's decode: at most HEADERS_KEPT,
#: oldest out first. Decoders read a meta, never change it.
_HEADERS: dict[bytes, tuple] = {}
HEADERS_KEPT = 256
_JSON = json.JSONDecoder(parse_constant=_no_constant)
# the header's fields before the name, after it (codec version, meta length), and the buffer count
_PREFIX = struct.Struct("<4sHB")
_VERSION_META = struct.Struct("<HI")
_NBUF = struct.Struct("<H")


def _parse_header(header: bytes) -> tuple[str, int, dict[str, Any], tuple[int, ...]]:
    """(name, version, meta, lengths) of a format version 1 or 2 header (its bytes up to the digest, magic and
    format already checked); raises ``struct.error``, ``UnicodeDecodeError`` or ``json.JSONDecodeError`` on a
    malformed one, :class:`CodecError` where its meta is not an object."""
    pos = _PREFIX.size
    nlen = header[pos - 1]
    name = header[pos: pos + nlen].decode(); pos += nlen
    version, mlen = _VERSION_META.unpack_from(header, pos); pos += _VERSION_META.size
    meta = _JSON.decode(header[pos: pos + mlen].decode()); pos += mlen
    if not isinstance(meta, dict):
        raise CodecError(f"corrupt payload header: its meta is a {type(meta).__name__}, not an object")
    (nbuf,) = _NBUF.unpack_from(header, pos); pos += _NBUF.size
    lengths = struct.unpack_from(f"<{nbuf}Q", header, pos); pos += 8 * nbuf
    if pos != len(header):
        raise struct.error(f"header of {len(header)} bytes, its fields end at {pos}")
    return name, version, meta, lengths


def _unpack(payload: Buffer, verify: bool = True):
    """:func:`unpack_payload` plus the digest ``check``; the meta returned is shared (:data:`_HEADERS`): read it,
    never change it."""
    mv = memoryview(payload).cast("B") if not isinstance(payload, np.ndarray) else memoryview(payload.view(np.uint8).reshape(-1))
    try:
        magic, fmt, nlen = _PREFIX.unpack_from(mv, 0)
        if magic != MAGIC:
            raise CodecError("not a qwen3vl-ray codec payload (bad magic)")
        if fmt not in READ_VERSIONS:
            raise CodecError(f"unsupported payload format version {fmt} (this build reads {', '.join(map(str, READ_VERSIONS))})")
        # the header's length from the three fields that give it, then the parse by its bytes
        pos = _PREFIX.size + nlen
        mlen = _VERSION_META.unpack_from(mv, pos)[1]
        pos += _VERSION_META.size + mlen
        header_end = pos + _NBUF.size + 8 * _NBUF.unpack_from(mv, pos)[0]
        key = mv[:header_end].tobytes()
        got = _HEADERS.get(key)
        if got is None:
            got = remember(_HEADERS, key, _parse_header(key), HEADERS_KEPT)
        name, version, meta, lengths = got
        (digest,) = _U64.unpack_from(mv, header_end)
        pos = header_end + 8
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"truncated or corrupt payload header: {exc}") from exc
    if pos + sum(lengths) != mv.nbytes:
        raise CodecError(f"payload length {mv.nbytes} does not match its header ({pos + sum(lengths)} expected): truncated or corrupt")
    bufs = []
    for n in lengths:
        bufs.append(mv[pos: pos + n]); pos += n
    check = (mv[:header_end], digest)
    if fmt == 1:
        h = xxhash.xxh3_64(mv[:header_end])
        for b in bufs:
            h.update(b)
        if h.intdigest() != digest:
            raise CodecError("payload checksum mismatch: corrupt data")
        check = None
    elif verify:
        check_digest(check, bufs)
        check = None
    return name, version, meta, bufs, check


def check_digest(check, buffers: Sequence[Buffer], digests: SegmentDigests | None = None) -> None:
    """Verify a format version 2 payload whose :func:`unpack_payload` ran with ``verify=False``: ``check`` is
    what :func:`_unpack` returned for it, ``digests`` the segment digests the caller took as it decoded (None:
    every buffer is hashed here). Raises :class:`CodecError` on a mismatch."""
    if check is None:
        return
    header, digest = check
    if (SegmentDigests.of(buffers) if digests is None else digests).digest(header, buffers) != digest:
        raise CodecError("payload checksum mismatch: corrupt data")


class Codec(ABC):
    """Encodes a tensor into a self-describing payload and back to its shape, dtype and device."""

    #: registry name, e.g. "int8"
    name: str = ""
    #: bumped when the byte layout changes; decode refuses versions it does not know
    version: int = 1
    #: True if decode(encode(x)) is bit-exact
    lossless: bool = False

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> bytearray: ...

    @abstractmethod
    def decode_parts(self, meta: dict[str, Any], buffers: list[memoryview], device: torch.device | str | None) -> torch.Tensor: ...

    def spec(self) -> str:
        """The spec string that rebuilds this codec with ``make_codec``."""
        return self.name

    def error_bound(self, tensor: torch.Tensor) -> float:
        """Upper bound on ``relative_error(tensor, decode(encode(tensor)))`` for this finite tensor.

        Lossless codecs return 0.0. Lossy ones compute it from the tensor (group maxima, rank budget, ...)
        so tests and ``auto`` can check the codec against it.
        """
        return 0.0

    def decode_into(self, meta: dict[str, Any], buffers: list[memoryview], out: torch.Tensor) -> None:
        """Decode into ``out`` (shape and dtype already checked against ``meta``). Codecs with a direct path
        override this; the default decodes into a new tensor and copies."""
        out.copy_(self.decode_parts(meta, buffers, out.device))

    def decode(self, payload: Buffer, device: torch.device | str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return decode(payload, device, out)

    #: True for codecs with :meth:`decode_checked` (their kernels hash the codes as they decode them)
    checks_digest: bool = False

    def decode_checked(self, meta: dict[str, Any], buffers: list[memoryview], device, out: torch.Tensor | None,
                       check) -> torch.Tensor:
        """Decode (into ``out`` when given) a payload whose digest is not verified yet, and verify it with
        :func:`check_digest` (``check`` from :func:`unpack_payload`'s ``verify=False``): before decoding, or
        after, from segment digests the decode took. Raises :class:`CodecError` on a mismatch."""
        check_digest(check, buffers)
        if out is None:
            return self.decode_parts(meta, buffers, device)
        self.decode_into(meta, buffers, out)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()!r})"


_REGISTRY: dict[str, Callable[..., Codec]] = {}


def register_codec(name: str) -> Callable[[type[Codec]], type[Codec]]:
    def deco(cls: type[Codec]) -> type[Codec]:
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


def available_codecs() -> list[str]:
    return sorted(_REGISTRY)


def _parse_params(text: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise CodecError(f"codec parameter {item!r} must look like name=value")
        k, v = item.split("=", 1)
        for conv in (int, float):
            try:
                params[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            params[k] = {"true": True, "false": False}.get(v.lower(), v)
    return params


def _params_of(factory: Callable[..., Codec]) -> str:
    try:
        names = [p for p in inspect.signature(factory).parameters if p != "self"]
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        names = []
    return ", ".join(names) or "none"


def _make_one(part: str) -> Codec:
    name, _, params = part.strip().partition(":")
    factory = _REGISTRY.get(name)
    if factory is None:
        raise CodecError(f"unknown codec {name!r}; available: {', '.join(available_codecs())}")
    try:
        return factory(**_parse_params(params))
    except TypeError as exc:
        raise CodecError(f"bad parameters {params!r} for codec {name!r} ({exc}); it takes: {_params_of(factory)}") from exc


def make_codec(spec: str | Codec | None) -> Codec:
    """Build a codec from ``"name"`` or ``"name:k=v,k=v"``; ``None``/``"none"`` is the identity codec.

    A ``"+zstd"`` suffix (``"int8+zstd"``, ``"int4:group=64+zstd:level=9"``) runs zstd over the payload
    of the codec before it.
    """
    if isinstance(spec, Codec):
        return spec
    spec = (spec or "none").strip()
    base, *wrappers = spec.split("+")
    codec = _make_one(base)
    for w in wrappers:
        outer = _make_one(w)
        if not hasattr(outer, "wrap"):
            raise CodecError(f"codec {w!r} cannot follow '+' in {spec!r}; only byte compressors can: zstd")
        codec = outer.wrap(codec)
    return codec


class OutMismatch(ValueError):
    """``decode(out=...)`` was given a tensor of another dtype or shape than the payload holds (the caller's
    mistake, not the payload's: a plain ``ValueError``)."""


def decode(payload: Buffer, device: torch.device | str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode any payload by the codec it names; into ``out`` (returned) when given.

    A preallocated ``out`` skips the result's allocation, whose first-touch page faults cost as much as the
    fused dequantization of a 36 MiB chunk. ``out`` must have the payload's shape and dtype (ValueError).
    """
    # format version 2: a codec whose kernels hash the codes as they read them checks the digest after its
    # decode (one pass over the codes instead of two); every other codec gets a verified payload, as before
    name, version, meta, bufs, check = _unpack(payload, verify=False)
    try:
        return _decode_unpacked(name, version, meta, bufs, check, device, out)
    except (CodecError, OutMismatch):
        raise
    except Exception as exc:
        # The header was read before its digest was checked, so a corrupt field (a zero group, a shape that is
        # a number) can fail anywhere in the decoder: a digest mismatch names the corruption; a payload that
        # passes it yet does not decode is corrupt all the same (its writer's), never an arbitrary exception.
        if check is not None:
            check_digest(check, bufs)
        raise CodecError(f"corrupt {name!r} payload: {exc!r}") from exc



def _decode_unpacked(name: str, version: int, meta: dict, bufs: list, check, device, out: torch.Tensor | None) -> torch.Tensor:
    """``decode`` from an unpacked payload whose digest ``check`` may still be unverified (see ``decode``)."""
    try:
        factory = _REGISTRY.get(name)
        if factory is None:
            raise CodecError(f"payload names unknown codec {name!r}; available: {', '.join(available_codecs())}")
        codec = factory.from_meta(meta) if hasattr(factory, "from_meta") else factory()
        if version != codec.version:
            raise CodecError(f"codec {name!r} payload version {version} is not supported (this build: {codec.version})")
    except Exception:
        check_digest(check, bufs)  # corruption is what a mangled name or version most likely is
        raise
    if check is not None and not (codec.checks_digest and "dtype" in meta and "shape" in meta):
        check_digest(check, bufs)
        check = None
    want = None if out is None else (dtype_name(out.dtype), list(out.shape))
    if want is not None and "dtype" in meta and "shape" in meta and (meta["dtype"], list(meta["shape"])) != want:
        check_digest(check, bufs)
        raise OutMismatch(f"decode: out is {want[0]} {want[1]}, the payload holds {meta['dtype']} {meta['shape']}")
    try:
        if check is not None:
            # on a digest mismatch ``out`` may already hold the corrupt payload's values (CodecError says so)
            return codec.decode_checked(meta, bufs, device if out is None else out.device, out, check)
        if out is None:
            return codec.decode_parts(meta, bufs, device)
        if "dtype" in meta and "shape" in meta:
            codec.decode_into(meta, bufs, out)
            return out
        y = codec.decode_parts(meta, bufs, out.device)  # a wrapper (zstd): its inner payload names the tensor
    except CodecError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise CodecError(f"corrupt {name!r} payload: {exc!r}") from exc
    if (dtype_name(y.dtype), list(y.shape)) != want:
        raise OutMismatch(f"decode: out is {want[0]} {want[1]}, the payload holds {dtype_name(y.dtype)} {list(y.shape)}")
    return out.copy_(y)


def transcode(payload: Buffer, target: str | Codec) -> bytearray:
    """Re-encode a stored payload with another codec (e.g. host int8 -> int4 under pressure)."""
    return make_codec(target).encode(decode(payload))


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``||reference - approx||_F / ||reference||_F`` in float64 (0.0 when both are all zeros)."""
    a = reference.detach().to("cpu", torch.float64)
    b = approx.detach().to("cpu", torch.float64)
    num = float(torch.linalg.vector_norm(a - b)) if a.numel() else 0.0
    den = float(torch.linalg.vector_norm(a)) if a.numel() else 0.0
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def payload_codec_name(payload: Buffer) -> str:
    return unpack_payload(payload)[0]


@register_codec("none")
class IdentityCodec(Codec):
    """Raw bytes plus dtype/shape: bit-exact."""

    lossless = True

    def encode(self, tensor: torch.Tensor) -> bytearray:
        meta = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}
        return pack_payload(self.name, self.version, meta, [tensor_bytes(tensor)])

    def decode_parts(self, meta, buffers, device):
        t = tensor_from_bytes(buffers[0], dtype_from_name(meta["dtype"]), meta["shape"])
        return t.to(device) if device is not None else t

    def decode_into(self, meta, buffers, out):
        if out.device.type != "cpu" or not out.is_contiguous():
            return super().decode_into(meta, buffers, out)
        raw = np.frombuffer(buffers[0], dtype=np.uint8)
        if raw.size != out.numel() * out.element_size():
            raise CodecError(f"payload holds {raw.size} bytes, {out.dtype} {tuple(out.shape)} needs {out.numel() * out.element_size()}")
        if raw.size:
            tensor_bytes(out)[:] = raw
