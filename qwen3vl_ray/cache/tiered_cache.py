"""The tiered cache: tiers are storage, policies order them, and this facade moves entries between them.

``TieredCache`` is the store's public, synchronous API over its two halves, as vLLM splits its offloading
(``vllm/v1/kv_offload``): the ``TierManager`` (``manager.py``), which keeps the records and plans every move
under one lock without copying bytes, and the ``DataMovers`` (``movers.py``), which carry the plans out
outside that lock. The facade does the byte work of its own calls around the manager's: it encodes a put's
tensors for each tier before asking the manager to place them, reads a hit's bytes between the manager's
``begin_load`` and ``end_load`` (and encodes a promotion for the top tier), and runs the movers on what the
call planned. Every call finishes its own moves before it returns. See ``manager.py`` for the invariants
(exclusive hierarchy, in-flight entries, what is never lost).

So no lookup or put waits on another entry's read, encode, memcpy or disk I/O
(``tests/test_store_disk_io.py``, ``tests/test_store_memory_moves.py``), with one exception: a store whose
room a reader is still copying a victim's bytes out of waits for that copy (``manager.READER_WAIT_S``).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Container, Iterable, Iterator, Sequence

import torch

from qwen3vl_ray.cache.config import CacheConfig
from qwen3vl_ray.cache.manager import EntryInfo, EntryListener, TierManager
from qwen3vl_ray.cache.movers import DataMovers
from qwen3vl_ray.cache.pending import PendingWrite
from qwen3vl_ray.errors import CapacityError, CodecError, ConfigError
from qwen3vl_ray.keys import CacheKey, validate_key
from qwen3vl_ray.policies import DEFAULT_POLICY, make_policy
from qwen3vl_ray.policies.base import EvictionPolicy
from qwen3vl_ray.tiers.base import Tier

log = logging.getLogger(__name__)

__all__ = ["EntryInfo", "EntryListener", "TieredCache"]


class TieredCache:
    """Public entry point of the store (see the module docstring).

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
        if policies is None:
            policies = [make_policy(config.policy or DEFAULT_POLICY) for _ in tiers]
        self.manager = TierManager(config, tiers, policies)
        self.tiers: list[Tier] = self.manager.tiers
        self.policies: list[EvictionPolicy] = self.manager.policies
        m = self.manager
        self._movers = DataMovers(self.tiers, m.read, m.sources_read, m.rooms_held, m.writes_done)
        self._prefetch_pool = (
            ThreadPoolExecutor(config.prefetch_threads, thread_name_prefix="qwen3vl-prefetch")
            if config.prefetch_threads
            else None
        )

    # ------------------------------------------------------------------ queries (the manager's)
    @property
    def tier_names(self) -> list[str]:
        return self.manager.tier_names

    def __len__(self) -> int:
        return len(self.manager)

    def contains(self, key: CacheKey) -> bool:
        return self.manager.contains(key)

    def contains_many(self, keys: Iterable[CacheKey]) -> list[bool]:
        return self.manager.contains_many(keys)

    def where(self, key: CacheKey) -> str | None:
        return self.manager.where(key)

    def entry_info(self, key: CacheKey) -> EntryInfo | None:
        """Where ``key`` is and how it has been used; None if absent."""
        return self.manager.entry_info(key)

    def parents(self, keys: Iterable[CacheKey]) -> list[CacheKey | None]:
        """Each key's chain parent (None: a chain's head, not a chain, or absent), under one lock round."""
        return self.manager.parents(keys)

    def longest_prefix(self, keys: Sequence[CacheKey]) -> int:
        """Number of leading ``keys`` present in any tier (a prefix hit stops at the first gap)."""
        return self.manager.longest_prefix(keys)

    def keys(self) -> Iterator[CacheKey]:
        return self.manager.keys()

    def add_listener(self, listener: EntryListener) -> None:
        """Hear every later move of an entry between tiers, into and out of the cache (``EntryListener``).
        Entries indexed before (found on disk at start) were never announced: a listener starts from ``keys``."""
        self.manager.add_listener(listener)

    def stats(self) -> dict:
        return self.manager.stats()

    # ------------------------------------------------------------------ store
    def put(self, key: CacheKey, tensor: torch.Tensor, parent: CacheKey | None = None) -> bool:
        """Store ``tensor`` in the highest tier that admits it. False if there is no room (counted);
        nothing already stored is lost by a failed put. A tier that cannot hold it (too big, or its codec refuses
        the tensor) passes it to the tiers below; raises CapacityError (too big for every tier) or CodecError
        (refused by some tier's codec, too big for the others) if no tier could ever hold it."""
        return self.put_many([(key, tensor, parent)])[0]

    def put_many(self, items: Sequence[tuple]) -> list[bool]:
        """Batched ``put``: items are ``(key, tensor)`` or ``(key, tensor, parent)``; per item, whether it is stored.

        One manager call per tier for the whole batch (one lock round, one make-room for its total), the
        encodes before it and the copies after it, outside the lock.
        Newest on top: when the batch is larger than a tier, its leading items go straight to the tier below
        (a sequence of puts would write them there and demote them at once)."""
        batch = [self._checked(item) for item in items]
        if len({k for k, _, _ in batch}) != len(batch):
            # the same key twice: each later one replaces the earlier, as in a sequence of puts
            return [self.put_many([item])[0] for item in batch]
        results = [False] * len(batch)
        refusals: list[list[ValueError]] = [[] for _ in batch]  # per item, each tier's reason it cannot hold it
        writes: list[PendingWrite] = []
        pending = list(range(len(batch)))
        try:
            for i, (tier, policy) in enumerate(zip(self.tiers, self.policies)):
                if not pending:
                    break
                down, cands = [], []
                for j in pending:  # encode outside the lock
                    key, tensor, parent = batch[j]
                    try:
                        prepared = tier.prepare_store(key, tensor)
                    except (CapacityError, CodecError) as exc:
                        # too big for this tier, or its codec refuses the tensor (NaN under int8, a vision feature
                        # under a KV codec): the tiers below may still take it
                        refusals[j].append(exc)
                        down.append(j)
                        continue
                    if not policy.admit(key, prepared.nbytes, parent):
                        self.manager.count_rejected(i)
                        down.append(j)
                        continue
                    cands.append((j, prepared))
                if cands:
                    down += self.manager.plan_store(i, cands, batch, results, writes)
                pending = sorted(down)
        finally:
            self._finish_writes(writes)
        for w in writes:
            if w.item is not None and not w.ok:
                results[w.item] = False
        for j, errors in enumerate(refusals):
            if len(errors) == len(self.tiers):
                # no tier can ever hold it: the caller's mistake, named (what the batch stored stays stored)
                tensor = batch[j][1]
                kind = CapacityError if all(isinstance(e, CapacityError) for e in errors) else CodecError
                raise kind(f"entry {tuple(tensor.shape)} {tensor.dtype} fits no tier: "
                           + "; ".join(f"{t.name}: {e}" for t, e in zip(self.tiers, errors)))
        return results

    @staticmethod
    def _checked(item: tuple) -> tuple[CacheKey, torch.Tensor, CacheKey | None]:
        key, tensor, parent = (*item, None) if len(item) == 2 else item
        key = validate_key(key)
        if parent is not None:
            parent = validate_key(parent)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"put expects a torch.Tensor, got {type(tensor).__name__}")
        return key, tensor, parent

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
        load = self.manager.begin_load(key)
        if load is None:
            return None, None
        try:
            # bytes move outside the lock (two-phase load); an entry being written is read from its bytes
            if load.staged is not None:
                tensor = self._copy_staged(load.tier, load.staged, out)
            else:
                tensor = self.manager.read(load.record if load.source is None else load.source, out)
        except BaseException:
            self.manager.abort_load(load)
            raise
        prepared = None
        if tensor is not None and promote and load.tier > 0 and load.staged is None and load.source is None \
                and self.tiers[0].holds_room:  # (an entry on its way between tiers is never promoted)
            # encoded for the top tier before the manager's lock is taken (a device codec may take a while)
            try:
                prepared = self.tiers[0].prepare_store(key, tensor)
            except (CapacityError, CodecError) as exc:
                log.debug("entry %s cannot move to tier %s: %s", key.hex()[:8], self.tiers[0].name, exc)
            except BaseException:  # anything else (a device out of memory) fails the read, never strands it
                self.manager.abort_load(load)
                raise
        writes: list[PendingWrite] = []
        try:
            tier_name = self.manager.end_load(key, load, tensor, promote, prepared, writes)
        finally:
            self._finish_writes(writes)
        if tensor is None:
            return None, None
        return (tensor.to(device) if device is not None else tensor), tier_name

    def _copy_staged(self, src: int, staged: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """A reader's copy of an entry whose write is in flight, as the tier would hand it out."""
        if out is not None:
            if tuple(out.shape) != tuple(staged.shape) or out.dtype != staged.dtype:
                raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, "
                                 f"entry is {staged.dtype} {tuple(staged.shape)}")
            return out.copy_(staged)
        device = getattr(self.tiers[src], "device", None) or torch.device("cpu")
        return staged.detach().to(device, copy=True)

    def touch(self, key: CacheKey) -> bool:
        """Record a hit served without copying through the cache (e.g. the Ray agent hands out an object-store
        reference): the entry's policy and idle clock see the access. False if absent."""
        return self.manager.touch(key)

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
            i = self.manager.tier_of(k)
            if i is not None and i > 0 and self.get(k, promote=True) is not None:
                moved += 1
        return moved

    # ------------------------------------------------------------------ lifecycle of entries
    def remove(self, key: CacheKey) -> bool:
        removed = self.manager.remove_entry(validate_key(key))
        self._finish_writes([])
        return removed

    def remove_many(self, keys: Iterable[CacheKey]) -> list[bool]:
        return [self.remove(k) for k in keys]

    def pin(self, key: CacheKey) -> bool:
        """Protect ``key`` from eviction and demotion until ``unpin``. False if absent."""
        return self.manager.pin(key)

    def unpin(self, key: CacheKey) -> bool:
        return self.manager.unpin(key)

    def pinned(self, keys: Iterable[CacheKey]):
        """Context manager: ``keys`` pinned inside it (yields those that were present)."""
        return self.manager.pinned(keys)

    def demote(self, key: CacheKey) -> bool:
        """Move ``key`` one tier down, or further if that tier cannot make room (out of the cache from the last
        tier, or when no tier below can take it). False if pinned/absent."""
        writes: list[PendingWrite] = []
        try:
            return self.manager.plan_demote(validate_key(key), writes)
        finally:
            self._finish_writes(writes)

    def victims(self, tier_name: str, nbytes: int, skip: Container[CacheKey] = ()) -> list[CacheKey]:
        """The entries of the first tier named ``tier_name`` that its policy would move out first to free
        ``nbytes`` (evictable ones, less ``skip``), in that order; nothing moves. A caller that moves them out
        of the store itself (the device budget handing a Ray worker's entries to its node agent) asks here so
        the order is the policy's, the same as the store's own evictions."""
        return self.manager.victims(tier_name, nbytes, skip)

    def relieve(self, tier_name: str, target_bytes: int) -> int:
        """Demote victims of the first tier named ``tier_name`` until it uses <= ``target_bytes``.
        Returns bytes freed. The pressure monitor calls this above a high watermark."""
        i = self.manager.tier_index(tier_name)
        writes: list[PendingWrite] = []
        try:
            before = self.manager.plan_relieve(i, target_bytes, writes)
        finally:
            self._finish_writes(writes)  # victims read out of the tier give their room back
        return max(0, before - self.tiers[i].used_bytes)

    def expire_idle(self, ttl_s: float | None = None, now: float | None = None) -> int:
        """Drop entries idle for longer than ``ttl_s`` (default ``config.idle_ttl_s``). Returns how many."""
        ttl = self.config.idle_ttl_s if ttl_s is None else ttl_s
        if ttl is None:
            return 0
        n = self.manager.expire(ttl, time.monotonic() if now is None else now)
        self._finish_writes([])
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

    # ------------------------------------------------------------------ writes (lock released)
    def _finish_writes(self, writes: list[PendingWrite]) -> None:
        """Run queued writes in rounds, holding the lock only between them: encode victims, hold room for them,
        write every entry, publish or give up. Then make this call's discards durable. Lock not held."""
        try:
            if writes:
                self._movers.run(writes)
        finally:
            for tier in self.tiers:
                tier.sync()
