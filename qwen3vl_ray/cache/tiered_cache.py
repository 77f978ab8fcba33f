"""The tiered cache: tiers are storage, policies order them, this class moves entries between them.

Exclusive hierarchy: an entry lives in exactly one tier at a time, so every byte budget counts each entry
once and ``where(key)`` has one answer. A hit below the top is promoted (moved up); making room in a tier
demotes its victims one tier down (further down when that tier cannot make room: its entries are pinned or
being read), and out of the last tier they are dropped.

Concurrency: one lock guards the index (metadata). Reads are two-phase: the entry is marked in flight under
the lock, its bytes are copied out without the lock, then the lock is taken again to finish. An entry that
is pinned or in flight is never chosen as a victim, so a slot is never reused while someone reads it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator, Sequence

import torch

from qwen3vl_ray.cache.config import CacheConfig
from qwen3vl_ray.errors import CapacityError, CodecError, ConfigError
from qwen3vl_ray.keys import CacheKey, validate_key
from qwen3vl_ray.policies import DEFAULT_POLICY, make_policy
from qwen3vl_ray.policies.base import EvictionPolicy
from qwen3vl_ray.tiers.base import Tier

log = logging.getLogger(__name__)

_VICTIM_BATCH = 8


@dataclass(slots=True)
class _Entry:
    """Index record of one cached entry (metadata only; bytes live in the tier, sizes in its index).

    Kept to five pointers: the per-entry budget (<= 256 B) is shared with the tier's and the policy's
    records. ``last_access`` points at a float shared by every entry touched in the same second.
    """

    tier: int
    parent: CacheKey | None
    last_access: float
    pins: int = 0
    in_flight: int = 0


class _CoarseClock:
    """``time.monotonic()`` rounded to whole seconds, one float object per second (idle TTLs are minutes)."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = float(int(time.monotonic()))

    def __call__(self) -> float:
        now = int(time.monotonic())
        if now != self._value:
            self._value = float(now)
        return self._value


@dataclass(slots=True)
class _TierCounters:
    hits: int = 0
    promotions_in: int = 0
    demotions_in: int = 0
    evictions: int = 0
    rejected: int = 0


class TieredCache:
    """Public entry point of the store. See the module docstring for the invariants.

    Args:
        config: tiers, policy and namespace.
        tiers: optional ready-made tier objects (one per ``config.tiers`` entry, same order). The Ray layer
            injects its object-store host tier this way; by default tiers are built from the config.
        policies: optional policy objects, one per tier (tests use this to script eviction).
    """

    def __init__(
        self,
        config: CacheConfig,
        tiers: Sequence[Tier] | None = None,
        policies: Sequence[EvictionPolicy] | None = None,
    ) -> None:
        self.config = config
        if tiers is None:
            from qwen3vl_ray.tiers.factory import make_tier

            tiers = [make_tier(tc, config.namespace) for tc in config.tiers]
        if len(tiers) != len(config.tiers):
            raise ConfigError(f"{len(tiers)} tier objects given for {len(config.tiers)} tier configs")
        self.tiers: list[Tier] = list(tiers)
        self.policies: list[EvictionPolicy] = (
            list(policies) if policies is not None else [make_policy(config.policy or DEFAULT_POLICY) for _ in self.tiers]
        )
        if len(self.policies) != len(self.tiers):
            raise ConfigError(f"{len(self.policies)} policies given for {len(self.tiers)} tiers")
        self._lock = threading.RLock()
        self._clock = _CoarseClock()
        self._index: dict[CacheKey, _Entry] = {}
        self._counters = [_TierCounters() for _ in self.tiers]
        self._misses = 0
        self._dropped = 0
        self._expired = 0
        self._prefetch_pool = (
            ThreadPoolExecutor(config.prefetch_threads, thread_name_prefix="qwen3vl-prefetch")
            if config.prefetch_threads
            else None
        )
        # Entries that survived a restart (the disk tier rebuilds its index) become visible again.
        for i, tier in enumerate(self.tiers):
            for key in list(tier.keys()):
                nbytes = tier.entry_nbytes(key)
                if nbytes is None or key in self._index:
                    continue
                self._index[key] = _Entry(i, None, self._clock())
                self.policies[i].on_insert(key, nbytes, None)

    # ------------------------------------------------------------------ queries
    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def __len__(self) -> int:
        return len(self._index)

    def contains(self, key: CacheKey) -> bool:
        return validate_key(key) in self._index

    def contains_many(self, keys: Iterable[CacheKey]) -> list[bool]:
        return [self.contains(k) for k in keys]

    def where(self, key: CacheKey) -> str | None:
        e = self._index.get(validate_key(key))
        return None if e is None else self.tiers[e.tier].name

    def longest_prefix(self, keys: Sequence[CacheKey]) -> int:
        """Number of leading ``keys`` present in any tier (a prefix hit stops at the first gap)."""
        n = 0
        for k in keys:
            if k not in self._index:
                break
            n += 1
        return n

    def keys(self) -> Iterator[CacheKey]:
        return iter(list(self._index))

    # ------------------------------------------------------------------ store
    def put(self, key: CacheKey, tensor: torch.Tensor, parent: CacheKey | None = None) -> bool:
        """Store ``tensor`` in the highest tier that admits it. False if there is no room (counted);
        nothing already stored is lost by a failed put. Raises CapacityError if no tier could ever hold it."""
        key = validate_key(key)
        if parent is not None:
            parent = validate_key(parent)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"put expects a torch.Tensor, got {type(tensor).__name__}")
        too_big: list[str] = []
        for i, (tier, policy) in enumerate(zip(self.tiers, self.policies)):
            try:
                prepared = tier.prepare_store(key, tensor)
            except CapacityError as exc:
                too_big.append(str(exc))
                continue
            if not policy.admit(key, prepared.nbytes, parent):
                self._counters[i].rejected += 1
                continue
            with self._lock:
                old = self._index.get(key)
                if old is not None and (old.pins or old.in_flight):
                    # Replacing an entry someone is reading would tear it; keep the old one.
                    self._counters[i].rejected += 1
                    return False
                if old is not None:
                    old.pins += 1  # keep the old value until the new one is in: a failed put loses nothing
                # A replace in the same tier frees the old entry's bytes as it lands (pooled tiers reuse them).
                freed = (tier.entry_nbytes(key) or 0) if old is not None and old.tier == i else 0
                try:
                    stored = self._make_room(i, prepared.nbytes - freed) and tier.complete_store(prepared)
                finally:
                    if old is not None:
                        old.pins -= 1
                if stored:
                    if old is not None and old.tier != i:
                        self.tiers[old.tier].remove(key)
                        self.policies[old.tier].on_remove(key)
                    # Same tier: on_insert of a present key is a use, which keeps the policy's links to the
                    # entry's cached children (remove + insert would orphan them).
                    self._index[key] = _Entry(i, parent, self._clock())
                    policy.on_insert(key, prepared.nbytes, parent)
                    return True
                self._counters[i].rejected += 1
        if len(too_big) == len(self.tiers):
            raise CapacityError(f"entry {tuple(tensor.shape)} {tensor.dtype} fits no tier: " + "; ".join(too_big))
        return False

    def put_many(self, items: Sequence[tuple]) -> list[bool]:
        """Batched ``put``: items are ``(key, tensor)`` or ``(key, tensor, parent)``."""
        return [self.put(*item) for item in items]

    # ------------------------------------------------------------------ load
    def get(self, key: CacheKey, promote: bool | None = None, device: torch.device | str | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.lookup(key, promote=promote, device=device, out=out)[0]

    def lookup(
        self, key: CacheKey, promote: bool | None = None, device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, str | None]:
        """``(tensor, tier name it was found in)`` or ``(None, None)``. Promotes a lower hit to the top.

        ``out``: a tensor of the entry's dtype and shape to read into (returned on a hit) instead of a new one:
        a caller reading many entries reuses one buffer and skips a fresh allocation's page faults per read.
        A mismatched ``out`` raises ``ValueError`` from the tier, nothing moved."""
        key = validate_key(key)
        promote = self.config.promote_on_hit if promote is None else promote
        with self._lock:
            e = self._index.get(key)
            if e is None:
                self._misses += 1
                self.policies[0].on_miss(key)
                return None, None
            e.in_flight += 1
            src = e.tier
        try:
            tensor = self.tiers[src].get(key, out=out)  # bytes move outside the lock (two-phase load)
        except BaseException:
            with self._lock:
                e.in_flight -= 1
            raise
        # Release the in-flight mark and finish in one critical section: in between, another thread could
        # demote the entry, and a promotion from the stale ``src`` would leave two copies.
        with self._lock:
            e.in_flight -= 1
            current = self._index.get(key) is e and e.tier == src
            if tensor is None:
                # The tier found it corrupt (and removed it) or lost it: a miss, never wrong data. Only an
                # entry still indexed where we read it is forgotten, and through its tier too, so the index
                # and the tiers never disagree about who holds it.
                if current:
                    self._drop(key, e, count_eviction=False)
                self._misses += 1
                return None, None
            e.last_access = self._clock()
            self._counters[src].hits += 1
            tier_name = self.tiers[src].name
            if current:
                self.policies[src].on_access(key)
                # Never move an entry another reader is still copying out of ``src``: its read would find
                # the bytes gone and report a false miss.
                if promote and src > 0 and not e.in_flight:
                    self._move(key, e, src, 0, tensor)
        return (tensor.to(device) if device is not None else tensor), tier_name

    def touch(self, key: CacheKey) -> bool:
        """Record a hit served without copying through the cache (e.g. the Ray agent hands out an object-store
        reference): the entry's policy and idle clock see the access. False if absent."""
        key = validate_key(key)
        with self._lock:
            e = self._index.get(key)
            if e is None:
                return False
            e.last_access = self._clock()
            self._counters[e.tier].hits += 1
            self.policies[e.tier].on_access(key)
            return True

    def get_many(self, keys: Sequence[CacheKey], promote: bool | None = None) -> list[torch.Tensor | None]:
        return [self.get(k, promote=promote) for k in keys]

    def prefetch(self, keys: Sequence[CacheKey]) -> Future:
        """Bring entries to the top tier without blocking the caller. The future yields how many moved."""
        keys = [validate_key(k) for k in keys]
        if self._prefetch_pool is None:
            fut: Future = Future()
            fut.set_result(self._promote_all(keys))
            return fut
        return self._prefetch_pool.submit(self._promote_all, keys)

    def _promote_all(self, keys: Sequence[CacheKey]) -> int:
        moved = 0
        for k in keys:
            e = self._index.get(k)
            if e is not None and e.tier > 0 and self.get(k, promote=True) is not None:
                moved += 1
        return moved

    # ------------------------------------------------------------------ lifecycle of entries
    def remove(self, key: CacheKey) -> bool:
        key = validate_key(key)
        with self._lock:
            e = self._index.get(key)
            if e is None:
                return False
            if e.in_flight:
                return False  # being read; the reader's copy stays valid, try again later
            self._drop(key, e, count_eviction=False)
            return True

    def remove_many(self, keys: Iterable[CacheKey]) -> list[bool]:
        return [self.remove(k) for k in keys]

    def pin(self, key: CacheKey) -> bool:
        """Protect ``key`` from eviction and demotion until ``unpin``. False if absent."""
        with self._lock:
            e = self._index.get(validate_key(key))
            if e is None:
                return False
            e.pins += 1
            return True

    def unpin(self, key: CacheKey) -> bool:
        with self._lock:
            e = self._index.get(validate_key(key))
            if e is None or e.pins == 0:
                return False
            e.pins -= 1
            return True

    @contextmanager
    def pinned(self, keys: Iterable[CacheKey]):
        held = [k for k in keys if self.pin(k)]
        try:
            yield held
        finally:
            for k in held:
                self.unpin(k)

    def demote(self, key: CacheKey) -> bool:
        """Move ``key`` one tier down, or further if that tier cannot make room (out of the cache from the last
        tier, or when no tier below can take it). False if pinned/absent."""
        key = validate_key(key)
        with self._lock:
            e = self._index.get(key)
            if e is None or e.pins or e.in_flight:
                return False
            self._evict_one(key, e)
            return True

    def relieve(self, tier_name: str, target_bytes: int) -> int:
        """Demote victims of the first tier named ``tier_name`` until it uses <= ``target_bytes``.
        Returns bytes freed. The pressure monitor calls this above a high watermark."""
        i = self._tier_index(tier_name)
        tier = self.tiers[i]
        with self._lock:
            before = tier.used_bytes
            self._make_room(i, max(0, tier.capacity_bytes - max(0, target_bytes)))
            return before - tier.used_bytes

    def expire_idle(self, ttl_s: float | None = None, now: float | None = None) -> int:
        """Drop entries idle for longer than ``ttl_s`` (default ``config.idle_ttl_s``). Returns how many."""
        ttl = self.config.idle_ttl_s if ttl_s is None else ttl_s
        if ttl is None:
            return 0
        now = time.monotonic() if now is None else now
        n = 0
        with self._lock:
            for key, e in list(self._index.items()):
                if now - e.last_access > ttl and not e.pins and not e.in_flight:
                    self._drop(key, e, count_eviction=False)
                    self._expired += 1
                    n += 1
        return n

    def close(self) -> None:
        if self._prefetch_pool is not None:
            self._prefetch_pool.shutdown(wait=True)
        for t in self.tiers:
            t.close()

    def __enter__(self) -> "TieredCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        with self._lock:
            tiers = []
            for t, c, p in zip(self.tiers, self._counters, self.policies):
                s = dict(t.stats())
                s.update(
                    name=t.name,
                    capacity_bytes=t.capacity_bytes,
                    used_bytes=t.used_bytes,
                    entries=sum(1 for e in self._index.values() if self.tiers[e.tier] is t),
                    hits=c.hits,
                    promotions_in=c.promotions_in,
                    demotions_in=c.demotions_in,
                    evictions=c.evictions,
                    rejected=c.rejected,
                    policy=getattr(p, "name", type(p).__name__),
                )
                tiers.append(s)
            hits = sum(c.hits for c in self._counters)
            lookups = hits + self._misses
            return {
                "namespace": self.config.namespace.hex,
                "entries": len(self._index),
                "hits": hits,
                "misses": self._misses,
                "hit_ratio": hits / lookups if lookups else 0.0,
                "dropped": self._dropped,
                "expired": self._expired,
                "pinned": sum(1 for e in self._index.values() if e.pins),
                "tiers": tiers,
            }

    # ------------------------------------------------------------------ internals (lock held)
    def _tier_index(self, name: str) -> int:
        for i, t in enumerate(self.tiers):
            if t.name == name:
                return i
        raise ConfigError(f"unknown tier {name!r}; this cache has: {', '.join(self.tier_names)}")

    def _evictable(self, key: CacheKey) -> bool:
        e = self._index.get(key)
        return e is not None and not e.pins and not e.in_flight

    def _make_room(self, i: int, nbytes: int) -> bool:
        """Demote tier ``i``'s victims until ``nbytes`` fit. False if pinned/in-flight entries prevent it."""
        tier = self.tiers[i]
        while tier.free_bytes < nbytes:
            # Take victims in small batches: evicting changes the policy's order, so never iterate its
            # structure while mutating it, and never materialise the whole order (O(n) per store).
            batch = list(islice(self.policies[i].victims(self._evictable), _VICTIM_BATCH))
            progressed = False
            for victim in batch:
                e = self._index.get(victim)
                if e is None or e.tier != i or not self._evictable(victim):
                    continue
                self._evict_one(victim, e)
                progressed = True
                if tier.free_bytes >= nbytes:
                    return True
            if not progressed:
                return False  # only pinned / in-flight entries left
        return True

    def _evict_one(self, key: CacheKey, e: _Entry) -> None:
        """Demote ``key`` to the nearest tier below that takes it; drop it only if none does (or from the last).

        The next tier down may be unable to take it: its entries all pinned or being read (e.g. a prompt
        longer than the host tier, pinned while it loads, whose promotions push other entries out of the
        device tier), or its codec refuses the tensor. The victim then skips that tier instead of being lost
        while a tier below has room."""
        src = e.tier
        if src + 1 < len(self.tiers):
            tensor = self.tiers[src].get(key)
            if tensor is not None:
                for dst in range(src + 1, len(self.tiers)):
                    if self._move(key, e, src, dst, tensor):
                        return
        self._drop(key, e, count_eviction=True)

    def _move(self, key: CacheKey, e: _Entry, src: int, dst: int, tensor: torch.Tensor) -> bool:
        """Copy ``tensor`` into tier ``dst`` (making room there), then release it from ``src``."""
        try:
            prepared = self.tiers[dst].prepare_store(key, tensor)
        except (CapacityError, CodecError) as exc:
            # Too big for that tier, or its codec refuses this tensor (a KV-layout codec and a vision
            # feature; NaN under int8): the entry cannot move there, which must not fail the caller's put.
            log.debug("entry %s cannot move to tier %s: %s", key.hex()[:8], self.tiers[dst].name, exc)
            return False
        # Pin while we make room below so the recursive demotions cannot pick this very entry.
        e.pins += 1
        try:
            if not (self._make_room(dst, prepared.nbytes) and self.tiers[dst].complete_store(prepared)):
                return False
        finally:
            e.pins -= 1
        self.tiers[src].remove(key)
        self.policies[src].on_remove(key)
        e.tier = dst
        self.policies[dst].on_insert(key, prepared.nbytes, e.parent)
        c = self._counters[dst]
        if dst < src:
            c.promotions_in += 1
        else:
            c.demotions_in += 1
        return True

    def _drop(self, key: CacheKey, e: _Entry, count_eviction: bool) -> None:
        self.tiers[e.tier].remove(key)
        self._forget(key, e)
        if count_eviction:
            self._counters[e.tier].evictions += 1
            self._dropped += 1

    def _forget(self, key: CacheKey, e: _Entry) -> None:
        self.policies[e.tier].on_remove(key)
        del self._index[key]
