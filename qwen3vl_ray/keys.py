"""Content keys: namespaced, chained prefix hashes.

A KV chunk is only valid after exactly the same prefix, so its key chains the hash of everything before
it: ``H_i = blake2b(H_{i-1} || tokens_i || extra_i)``. ``extra_i`` carries content that token ids do not
show: an image's placeholder tokens are all the same id, so the image's own content hash (and its token
offset) is folded in; without it every image would share one KV (LMCache #690).

The namespace (model fingerprint, dtype, layout, codec, tenant) seeds ``H_0``, so the same tokens under
another model or dtype give unrelated keys, and tiers additionally record it to refuse cross-namespace
reads. BLAKE2b with a 128-bit digest: a collision here silently serves the wrong KV, so no short hashes.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass, field
from typing import NewType, Sequence

import numpy as np

CacheKey = NewType("CacheKey", bytes)
"""A 16-byte digest. Never a path: tiers turn it into a file name only through ``key_hex``."""

KEY_BYTES = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,128}$")


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for p in parts:
        # Length-prefix every part so that ("ab", "c") and ("a", "bc") never hash alike.
        h.update(struct.pack("<Q", len(p)))
        h.update(p)
    return h.digest()


@dataclass(frozen=True, slots=True)
class Namespace:
    """What an entry is only valid for. Two namespaces never share an entry.

    Attributes:
        model: model fingerprint (e.g. a hash of config + weights index), not a user-chosen path.
        dtype: storage dtype of the cached tensors, e.g. ``"bfloat16"``.
        layout: tensor layout tag, e.g. ``"kv:L2xH2xD32:chunk256"``.
        codec: codec spec of the producer; a change of codec must not serve old payloads as new.
        tenant: isolates tenants that share a cluster; ``"default"`` when there is one.
    """

    model: str
    dtype: str = "float32"
    layout: str = "tensor"
    codec: str = "none"
    tenant: str = "default"
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("model", "dtype", "layout", "codec", "tenant"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"Namespace.{name} must be a non-empty string, got {value!r}")
        parts = [b"qwen3vl-ray/ns/v1"] + [getattr(self, n).encode() for n in ("model", "dtype", "layout", "codec", "tenant")]
        object.__setattr__(self, "digest", _digest(*parts))

    @property
    def hex(self) -> str:
        return self.digest.hex()


def validate_key(key: object) -> CacheKey:
    """Return ``key`` if it is a well-formed key, else raise ``TypeError``/``ValueError`` naming it."""
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"cache key must be bytes of length {KEY_BYTES}, got {type(key).__name__}")
    if len(key) != KEY_BYTES:
        raise ValueError(f"cache key must be {KEY_BYTES} bytes, got {len(key)}")
    return CacheKey(bytes(key))


def key_hex(key: CacheKey) -> str:
    """The only way a key becomes part of a file name: 32 lowercase hex characters."""
    return validate_key(key).hex()


def key_from_hex(text: str) -> CacheKey:
    if not re.fullmatch(r"[0-9a-f]{%d}" % (2 * KEY_BYTES), text):
        raise ValueError(f"not a cache key in hex: {text!r}")
    return CacheKey(bytes.fromhex(text))


def _tokens_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be 1-D, got shape {arr.shape}")
    return arr.tobytes()


def prefix_key(namespace: Namespace, parent: CacheKey | None, tokens: Sequence[int] | np.ndarray, extra: bytes = b"") -> CacheKey:
    """One link of the chain: the key of a chunk given its parent's key (``None`` for the first chunk)."""
    seed = namespace.digest if parent is None else validate_key(parent)
    return CacheKey(_digest(b"chunk", seed, _tokens_bytes(tokens), extra))


def chunk_keys(
    namespace: Namespace,
    token_ids: Sequence[int] | np.ndarray,
    chunk_size: int,
    extras: Sequence[bytes] | None = None,
    include_partial: bool = False,
) -> list[CacheKey]:
    """Chained keys of consecutive ``chunk_size``-token chunks of ``token_ids``.

    ``extras[i]`` is the non-token content of chunk ``i`` (see :func:`image_extras`). A trailing partial
    chunk gets a key only with ``include_partial`` (its KV is not reusable by longer prompts otherwise).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    ids = np.asarray(token_ids, dtype=np.int64)
    n_full = len(ids) // chunk_size
    n = n_full + (1 if include_partial and len(ids) % chunk_size else 0)
    if extras is not None and len(extras) < n:
        raise ValueError(f"extras has {len(extras)} entries for {n} chunks")
    keys: list[CacheKey] = []
    parent: CacheKey | None = None
    for i in range(n):
        parent = prefix_key(namespace, parent, ids[i * chunk_size:(i + 1) * chunk_size], extras[i] if extras else b"")
        keys.append(parent)
    return keys


@dataclass(frozen=True, slots=True)
class ImageSpan:
    """An image's place in the prompt: its content hash and the token range [start, end) it fills."""

    content_hash: bytes
    start: int
    end: int


def image_extras(spans: Sequence[ImageSpan], n_tokens: int, chunk_size: int) -> list[bytes]:
    """Per-chunk ``extra`` bytes: every image overlapping a chunk, with its offsets, folded in.

    Offsets are included so the same image at another position (or cut differently) is another key.
    """
    n_chunks = -(-n_tokens // chunk_size) if n_tokens else 0
    extras = [b""] * n_chunks
    for span in spans:
        if not (0 <= span.start < span.end <= n_tokens):
            raise ValueError(f"image span [{span.start}, {span.end}) outside a {n_tokens}-token prompt")
        for c in range(span.start // chunk_size, (span.end - 1) // chunk_size + 1):
            extras[c] += b"img" + struct.pack("<qq", span.start, span.end) + span.content_hash
    return extras


def content_hash(*arrays: np.ndarray | bytes) -> bytes:
    """128-bit BLAKE2b of raw content (e.g. preprocessed pixels plus grid), dtype and shape included."""
    parts: list[bytes] = []
    for a in arrays:
        if isinstance(a, (bytes, bytearray, memoryview)):
            parts.append(bytes(a))
        else:
            arr = np.ascontiguousarray(a)
            parts.append(f"{arr.dtype.str}{arr.shape}".encode())
            parts.append(arr.tobytes())
    return _digest(b"content", *parts)


def content_key(namespace: Namespace, kind: str, content: bytes) -> CacheKey:
    """Key of a whole-content entry (e.g. an image's vision features) under a namespace."""
    if not _NAME_RE.match(kind):
        raise ValueError(f"content kind must match {_NAME_RE.pattern}, got {kind!r}")
    return CacheKey(_digest(b"content-key", namespace.digest, kind.encode(), content))
