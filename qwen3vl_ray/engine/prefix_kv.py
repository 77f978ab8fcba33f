"""Prefix KV reuse: chunk keys, loading the longest cached prefix, storing new full chunks.

Metadata vs. data: this module decides *which* chunks a prompt can reuse and moves their bytes between the
store and a transformers ``DynamicCache``; the store decides where they live.

A chunk's key chains everything before it (``qwen3vl_ray.keys.chunk_keys``) with each overlapping image's
content hash and offsets folded in, under a namespace carrying the model fingerprint, dtype, layout and
codecs; so two images with the same text, or the same image at another resolution, never share KV.

One chunk is one tensor ``[layers, 2 (k, v), kv_heads, chunk_tokens, head_dim]`` in the model dtype. The
keys inside already carry their rotary embedding (MRoPE positions of the *whole* prompt), which is why the
engine computes the suffix's positions for the whole sequence and slices them.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from qwen3vl_ray.engine.kv_layer import growing_cache
from qwen3vl_ray.keys import CacheKey, ImageSpan, Namespace, chunk_keys, image_extras, prefix_key
from qwen3vl_ray.tiers.config import TierConfig

logger = logging.getLogger(__name__)


_MIN_BLOCK = 4096


def chunk_fitted_tiers(tiers: Sequence[TierConfig], chunk_bytes: int) -> list[TierConfig]:
    """``tiers`` with each pooled (device/host) tier's ``block_bytes`` lowered so a raw KV chunk of
    ``chunk_bytes`` fills whole blocks: the largest power of two dividing ``chunk_bytes`` that is not above
    the configured size (never below 4 KiB). A tier with a codec stores smaller, odd-sized payloads, so its
    blocks are a further 8x smaller (each payload wastes under an eighth of a raw chunk).

    Why: a pool accounts in whole blocks. With the default 1 MiB block, a 16 KiB chunk of a small model (or a
    2.25 MiB chunk of the 8B at 16 tokens) would occupy 1 MiB (3 MiB): the tier's budget would hold a
    fraction of the KV it was sized for."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    pow2 = chunk_bytes & -chunk_bytes  # largest power of two dividing chunk_bytes
    out = []
    for t in tiers:
        if t.kind in ("device", "host"):
            block = min(t.block_bytes, pow2)
            if t.codec != "none":
                block //= 8
            block = max(_MIN_BLOCK, block)
            if block < t.block_bytes:
                t = replace(t, block_bytes=block)
        out.append(t)
    return out


@dataclass(slots=True)
class KVGeometry:
    """Shape of the text model's KV; ``bytes_per_token`` is what one token costs across all layers."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_text_config(cls, cfg: Any, dtype: torch.dtype) -> "KVGeometry":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def layout(self, chunk_tokens: int) -> str:
        return f"kv:L{self.layers}xH{self.kv_heads}xD{self.head_dim}:chunk{chunk_tokens}"


@dataclass(slots=True)
class LoadedPrefix:
    """KV of the first ``n_tokens`` prompt tokens, ready to continue from, and where it came from."""

    cache: DynamicCache
    n_tokens: int
    tiers: dict[str, int] = field(default_factory=dict)


def chunk_tensor(cache: DynamicCache, start: int, end: int) -> torch.Tensor:
    """Tokens [start, end) of a batch-1 DynamicCache as one ``[layers, 2, kv_heads, n, head_dim]`` tensor."""
    return torch.stack(
        [torch.stack((layer.keys[0, :, start:end], layer.values[0, :, start:end])) for layer in cache.layers]
    ).contiguous()


def is_kv_chunk_shape(shape: tuple[int, ...]) -> bool:
    """Whether a stored entry of this shape is a KV chunk (``chunk_tensor``'s ``[layers, 2, kv_heads, n,
    head_dim]``; the engine's other entries, vision features, are ``[1 + deepstack, tokens, hidden]``)."""
    return len(shape) == 5 and shape[1] == 2


class PrefixKV:
    """Finds, loads and stores a prompt's KV chunks in a TieredCache."""

    def __init__(self, store: Any, namespace: Namespace, chunk_tokens: int, text_config: Any, device: torch.device,
                 geometry: "KVGeometry"):
        self.store = store
        self.namespace = namespace
        self.chunk_tokens = chunk_tokens
        self.text_config = text_config
        self.device = device
        self.geometry = geometry
        self._workspace: torch.Tensor | None = None
        self._staging_buf: torch.Tensor | None = None

    def workspace(self, geometry: "KVGeometry", n_tokens: int) -> torch.Tensor:
        """The reusable KV buffer ``[2, layers, 1, kv_heads, capacity, head_dim]`` for ``n_tokens`` tokens.

        Reused by every request (grown in whole chunks when one needs more): a fresh allocation per
        request would pay page faults on every byte. Safe because requests run one at a time and a
        request's cache is dropped before the next starts."""
        ws = self._workspace
        if ws is None or ws.shape[4] < n_tokens:
            cap = -(-n_tokens // self.chunk_tokens) * self.chunk_tokens
            self._workspace = None  # free the old one first
            with torch.inference_mode(False):  # a normal tensor: usable in and outside inference mode
                ws = torch.zeros((2, geometry.layers, 1, geometry.kv_heads, cap, geometry.head_dim),
                                 dtype=geometry.dtype, device=self.device)  # zeros: touch every page now
            self._workspace = ws
        return ws

    def new_cache(self, capacity_tokens: int) -> DynamicCache:
        """An empty cache for a request of up to ``capacity_tokens`` tokens (prompt + new tokens)."""
        return growing_cache(self.text_config, self.workspace(self.geometry, capacity_tokens), 0)

    def keys(self, token_ids: torch.Tensor | Sequence[int], spans: Sequence[ImageSpan]) -> list[CacheKey]:
        """Keys of the full chunks of ``token_ids`` (images folded in by content hash and offset)."""
        n = len(token_ids)
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        extras = image_extras(spans, n, self.chunk_tokens) if spans else None
        return chunk_keys(self.namespace, ids, self.chunk_tokens, extras)

    def tail_key(self, token_ids: torch.Tensor | Sequence[int], spans: Sequence[ImageSpan],
                 full_keys: Sequence[CacheKey]) -> CacheKey | None:
        """Key of the partial last chunk (tokens after the last full chunk), chained to the last full key.

        Only an identical token run (same images) after an identical prefix has this key, so it serves
        exact repeats and session continuations; a longer prompt's full chunk supersedes it."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        start = len(full_keys) * self.chunk_tokens
        if start >= len(ids):
            return None
        extras = image_extras(spans, len(ids), self.chunk_tokens) if spans else []
        extra = b"partial" + (extras[len(full_keys)] if len(full_keys) < len(extras) else b"")
        return prefix_key(self.namespace, full_keys[-1] if full_keys else None, ids[start:], extra)

    def pinned(self, keys: Sequence[CacheKey | None]):
        """Hold ``keys`` in the store while a prefix is read: promoting its first chunks makes room by
        demoting others, and without pins that cascade can evict the very chunks still to be read."""
        keys = [k for k in keys if k is not None]
        return self.store.pinned(keys) if hasattr(self.store, "pinned") else nullcontext()

    def read(self, full_keys: Sequence[CacheKey], tail: CacheKey | None, max_tokens: int,
             capacity_tokens: int = 0) -> LoadedPrefix | None:
        """A cache holding the first ``min(cached tokens, max_tokens)`` tokens of the leading run of
        ``full_keys`` present in the store (then ``tail``, the partial chunk after them, if every full chunk
        was there and more tokens are wanted), with room for ``capacity_tokens`` in all.

        Each chunk is read into one reusable staging buffer and copied straight into the workspace, so a
        hit allocates nothing per chunk (a fresh chunk-sized tensor costs page faults on every byte)."""
        if max_tokens <= 0:
            return None
        c = self.chunk_tokens
        full_keys = list(full_keys[: -(-max_tokens // c)])
        with self.pinned(full_keys + [tail]):
            n = self.store.longest_prefix(full_keys) if full_keys else 0
            want_tail = tail is not None and n == len(full_keys) and n * c < max_tokens
            if n == 0 and not want_tail:
                self._report_miss(full_keys, n)
                return None
            # sized for all that can arrive before the first copy: growing it later would drop what is in it
            ws = self.workspace(self.geometry, max(min(max_tokens, n * c + (c if want_tail else 0)), capacity_tokens))
            staging = self._staging()
            pos, per_tier = 0, {}
            for key in full_keys[:n]:
                tensor, tier = self._lookup(key, staging)
                if tensor is None:
                    # Evicted between longest_prefix and now: keep the leading run that arrived.
                    logger.info("prefix shrank from %d to %d chunks while loading (concurrent eviction)", n, pos // c)
                    want_tail = False
                    break
                pos = self._append(tensor, tier, pos, max_tokens, ws, per_tier)
            else:
                self._report_miss(full_keys, n)  # (a run that shrank reported its miss in its own lookup)
            if want_tail and pos == n * c:
                tensor, tier = self._lookup(tail, None)  # a partial chunk: its own shape
                if tensor is not None:
                    pos = self._append(tensor, tier, pos, max_tokens, ws, per_tier)
        if pos == 0:
            return None
        return LoadedPrefix(growing_cache(self.text_config, ws, pos), pos, per_tier)

    def _report_miss(self, full_keys: Sequence[CacheKey], n: int) -> None:
        """Tell the store that ``full_keys[n]``, the first chunk after the cached run, was wanted and missing:
        ``longest_prefix`` only looks, and the store's policies learn from misses (chain-arc's ghosts). A lookup
        of an absent key is exactly that report (counted, heard by every tier's policy); the chunks after it
        were never reachable and are not reported."""
        if n < len(full_keys):
            self.store.lookup(full_keys[n])

    def _lookup(self, key: CacheKey, out: torch.Tensor | None) -> tuple[torch.Tensor | None, str | None]:
        try:
            tensor, tier = self.store.lookup(key, out=out)  # promotes a lower hit; reports where it was found
        except ValueError:  # an entry of another shape than the staging buffer (nothing moved): plain read
            tensor, tier = self.store.lookup(key)
        return tensor, tier

    @staticmethod
    def _append(chunk: torch.Tensor, tier: str, pos: int, max_tokens: int, ws: torch.Tensor,
                per_tier: dict[str, int]) -> int:
        """Copy ``chunk``'s tokens (up to ``max_tokens`` in all) into ``ws`` at ``pos``; the new position."""
        take = min(int(chunk.shape[3]), max_tokens - pos)
        if take > 0:
            src = chunk.to(ws.device, non_blocking=True)
            # k and v separately: a transposed source defeats the copy kernel's coalescing (~20x slower on CPU)
            ws[0, :, 0, :, pos:pos + take].copy_(src[:, 0, :, :take])
            ws[1, :, 0, :, pos:pos + take].copy_(src[:, 1, :, :take])
            per_tier[tier] = per_tier.get(tier, 0) + take
        return pos + max(take, 0)

    def _staging(self) -> torch.Tensor:
        """One full chunk ``[layers, 2, kv_heads, chunk_tokens, head_dim]`` on the model's device, reused by
        every read (requests run one at a time, and each chunk is copied out before the next is read)."""
        g = self.geometry
        shape = (g.layers, 2, g.kv_heads, self.chunk_tokens, g.head_dim)
        if self._staging_buf is None or tuple(self._staging_buf.shape) != shape:
            with torch.inference_mode(False):
                self._staging_buf = torch.zeros(shape, dtype=g.dtype, device=self.device)  # zeros: pages touched now
        return self._staging_buf

    def load(self, keys: Sequence[CacheKey], max_tokens: int, tail: CacheKey | None = None,
             capacity_tokens: int = 0) -> LoadedPrefix | None:
        """Load the longest run of leading ``keys`` present in any tier (then ``tail`` if every full chunk
        was there), capped at ``max_tokens`` tokens."""
        return self.read(keys, tail, max_tokens, capacity_tokens)

    def store_tail(self, cache: DynamicCache, tail: CacheKey, start: int, end: int, parent: CacheKey | None) -> bool:
        """Store tokens [start, end) of ``cache`` as the partial entry ``tail`` (False: held already, or no room)."""
        if self.store.contains(tail):
            return False
        return bool(self.store.put(tail, chunk_tensor(cache, start, end), parent=parent))

    def store_new(self, cache: DynamicCache, keys: Sequence[CacheKey]) -> int:
        """Store the full chunks of ``cache`` that the store lacks; returns how many were stored."""
        have = cache.get_seq_length()
        items = []
        for i, key in enumerate(keys):
            end = (i + 1) * self.chunk_tokens
            if end > have:
                break
            if self.store.contains(key):  # its read (if this request loaded it) was the store's hit already
                continue
            parent = keys[i - 1] if i else None
            items.append((key, chunk_tensor(cache, i * self.chunk_tokens, end), parent))
        if not items:
            return 0
        stored = self.store.put_many(items)
        n_ok = sum(bool(s) for s in stored)
        if n_ok < len(items):
            logger.info("store kept %d of %d new KV chunks (no room)", n_ok, len(items))
        return n_ok
