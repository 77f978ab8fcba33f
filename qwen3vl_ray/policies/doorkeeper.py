"""A two-generation Bloom filter that remembers which keys were seen recently (TinyLFU's "doorkeeper").

Metadata side only, a few bytes per remembered key. Einziger, Friedman & Manes, "TinyLFU: A Highly
Efficient Cache Admission Policy" (ACM ToS 2017) put such a filter in front of their frequency sketch to
tell one-hit wonders from keys that come back. Here it answers "was this key seen within roughly the
last ``window`` .. ``2 * window`` insertions?": a key goes into the current generation; when that holds
``window`` keys it becomes the previous one and a fresh one starts, so old keys are forgotten in bulk
without per-key bookkeeping. False positives (about 1% at 10 bits and 3 probes per key) only make a new
key look familiar, which costs a little hit ratio, never correctness.
"""

from __future__ import annotations

from typing import Hashable

_MASK = (1 << 64) - 1
_MUL1 = 0x9E3779B97F4A7C15  # odd 64-bit constants: spread Python's hash (identity for small ints)
_MUL2 = 0xC2B2AE3D27D4EB4F
_BITS_PER_KEY = 10
_PROBES = 3


class Doorkeeper:
    """``seen_then_add(key)`` -> whether ``key`` was added within the last one to two windows."""

    __slots__ = ("window", "_bits", "_old", "_count")

    def __init__(self, window: int = 4096) -> None:
        if window < 1:
            raise ValueError(f"Doorkeeper window must be >= 1 key, got {window}")
        self._old = bytearray(8)
        self._start(window)

    def _start(self, window: int) -> None:
        self.window = window
        self._bits = bytearray(max(8, (window * _BITS_PER_KEY + 7) // 8))
        self._count = 0

    @staticmethod
    def _hashes(key: Hashable) -> tuple[int, int]:
        # Double hashing (Kirsch & Mitzenmacher): probe i is (a + i*b) mod the filter's size in bits, so one
        # pair serves both generations even though their sizes differ. A cache key is already a content hash:
        # its leading bytes are used as they are, so the filter (and every decision of a policy that asks it)
        # is the same in every process; Python's hash of bytes is seeded per process.
        h = int.from_bytes(key[:8], "little") if isinstance(key, bytes) and len(key) >= 8 else hash(key)
        return ((h * _MUL1) & _MASK) >> 7, (((h ^ (h >> 29)) * _MUL2) & _MASK) | 1

    @staticmethod
    def _has(bits: bytearray, a: int, b: int) -> bool:
        n = len(bits) << 3
        for i in range(_PROBES):
            p = (a + i * b) % n
            if not bits[p >> 3] >> (p & 7) & 1:
                return False
        return True

    def __contains__(self, key: Hashable) -> bool:
        a, b = self._hashes(key)
        return self._has(self._bits, a, b) or self._has(self._old, a, b)

    def seen_then_add(self, key: Hashable, window: int | None = None) -> bool:
        """Whether ``key`` was seen recently; then remember it. ``window`` (keys) sizes the next generation,
        so the filter follows the tier's entry count."""
        a, b = self._hashes(key)
        bits = self._bits
        seen = self._has(bits, a, b) or self._has(self._old, a, b)
        n = len(bits) << 3
        for i in range(_PROBES):
            p = (a + i * b) % n
            bits[p >> 3] |= 1 << (p & 7)
        self._count += 1
        if self._count >= self.window:
            self._old = self._bits
            self._start(window or self.window)
        return seen

    @property
    def nbytes(self) -> int:
        return len(self._bits) + len(self._old)
