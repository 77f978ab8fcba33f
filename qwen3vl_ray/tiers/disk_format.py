"""On-disk entry format of the disk tier: a self-describing header, then the raw payload. Never pickle.

Layout (little-endian), header padded to a multiple of 64 bytes so the payload starts aligned::

    magic  b"QVTIER\\r\\n" (8)  | u16 format version | u32 header_len (bytes, incl. padding and check)
    key (16) | namespace digest (16) | u64 payload_len | payload xxh3_128 (16)
    u8 len + dtype name | u8 len + codec spec | u8 ndim + ndim x u64 shape
    zero padding | u64 xxh3_64 of every header byte before it

The header carries its own checksum so the index can be rebuilt from headers alone (read 4 KiB per file,
no payload hashing) and still reject torn or flipped headers; the payload checksum is verified on read.
``\\r\\n`` in the magic catches text-mode mangling. A file whose size is not ``header_len + payload_len``
is truncated (or has trailing junk) and is rejected before any payload is read.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import xxhash

from qwen3vl_ray.errors import CorruptEntryError

MAGIC = b"QVTIER\r\n"
FORMAT_VERSION = 1
SUFFIX = ".qvt"
ALIGN = 64
MAX_HEADER = 4096  # what the index rebuild reads per file; a header is never larger
MAX_NDIM = 64

_PREFIX = struct.Struct("<8sHI")
_FIXED = struct.Struct("<16s16sQ16s")
_CHECK = struct.Struct("<Q")


class EntryHeader(NamedTuple):
    """A parsed header. A NamedTuple, not a frozen dataclass: it is built on every read, and a frozen
    slotted dataclass took ~5 us to construct here (one ``object.__setattr__`` per field) vs < 1 us."""

    key: bytes
    namespace: bytes
    payload_len: int
    checksum: bytes  # xxh3_128 digest of the payload
    dtype: str
    codec: str
    shape: tuple[int, ...]
    header_len: int

    @property
    def file_len(self) -> int:
        return self.header_len + self.payload_len


def header_len(dtype: str, codec: str, ndim: int) -> int:
    raw = _PREFIX.size + _FIXED.size + 1 + len(dtype.encode()) + 1 + len(codec.encode()) + 1 + 8 * ndim + _CHECK.size
    return -(-raw // ALIGN) * ALIGN


def payload_checksum(payload) -> bytes:
    return xxhash.xxh3_128_digest(payload)


def check_fields(dtype: str, codec: str, ndim: int) -> None:
    """Raise ``ValueError`` if an entry with these fields cannot be written in this format."""
    if ndim > MAX_NDIM:
        raise ValueError(f"tensor has {ndim} dims; the disk format allows at most {MAX_NDIM}")
    if len(dtype.encode()) > 255 or len(codec.encode()) > 255:
        raise ValueError(f"dtype {dtype!r} / codec {codec!r} name longer than 255 bytes")


def encode_header(key: bytes, namespace: bytes, dtype: str, codec: str, shape: tuple[int, ...], payload_len: int, checksum: bytes) -> bytes:
    check_fields(dtype, codec, len(shape))
    d, c = dtype.encode(), codec.encode()
    n = header_len(dtype, codec, len(shape))
    body = (
        _PREFIX.pack(MAGIC, FORMAT_VERSION, n)
        + _FIXED.pack(key, namespace, payload_len, checksum)
        + bytes((len(d),)) + d + bytes((len(c),)) + c
        + bytes((len(shape),)) + struct.pack(f"<{len(shape)}Q", *shape)
    )
    body += bytes(n - _CHECK.size - len(body))
    return body + _CHECK.pack(xxhash.xxh3_64_intdigest(body))


def decode_header(buf: bytes | memoryview) -> EntryHeader:
    """Parse and verify a header from the first bytes of a file. Raises :class:`CorruptEntryError`."""
    if len(buf) < _PREFIX.size:
        raise CorruptEntryError(f"file too short for a header ({len(buf)} bytes)")
    magic, version, n = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CorruptEntryError(f"bad magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(f"format version {version} is not readable by this build (reads {FORMAT_VERSION})")
    if n % ALIGN or not (_PREFIX.size + _FIXED.size + _CHECK.size < n <= MAX_HEADER) or n > len(buf):
        raise CorruptEntryError(f"bad header length {n} (file prefix read: {len(buf)} bytes)")
    (check,) = _CHECK.unpack_from(buf, n - _CHECK.size)
    if xxhash.xxh3_64_intdigest(memoryview(buf)[: n - _CHECK.size]) != check:
        raise CorruptEntryError("header checksum mismatch")
    try:
        key, ns, payload_len, checksum = _FIXED.unpack_from(buf, _PREFIX.size)
        pos = _PREFIX.size + _FIXED.size
        dl = buf[pos]; dtype = str(buf[pos + 1: pos + 1 + dl], "utf-8"); pos += 1 + dl
        cl = buf[pos]; codec = str(buf[pos + 1: pos + 1 + cl], "utf-8"); pos += 1 + cl
        nd = buf[pos]; shape = struct.unpack_from(f"<{nd}Q", buf, pos + 1)
    except (struct.error, UnicodeDecodeError, IndexError) as exc:  # checksum passed: a writer bug, not bit rot
        raise CorruptEntryError(f"malformed header: {exc}") from exc
    return EntryHeader(key, ns, payload_len, checksum, dtype, codec, shape, n)
