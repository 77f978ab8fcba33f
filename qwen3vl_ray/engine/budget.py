"""The device KV budget: refuse what can never fit, swap idle sessions down to make room for the rest.

Metadata side (bytes move in the store, or in one batched hand-down to a tier below). The budget covers the
store's device tier plus the live KV of the running request (prompt + new tokens). Before a request runs,
``make_room`` demotes device-resident entries down the tiers, idle sessions' first, then in the device tier
policy's own order (the order the store's evictions use); nothing is dropped, so a swapped session comes back
from host or disk on its next turn without recompute. The budget keeps no record of its own: which entries
are on the device, their chain parents and the victim order are the store's, the idle sessions' keys the
session table's.

When the device tier is the store's last tier (a Ray worker's store: host and disk are the node agent's), a
demotion would drop the entry, so the budget hands its victims to ``below`` (``TierBelow``: the node's host
tier) in one batch first and drops only the device copies that ``below`` now holds. Entries ``below`` already
had (full prompt chunks the worker wrote through) are not sent again; one ``below`` refuses is dropped with a
warning that counts it (``lost``), never silently. Only the entries ``hand_down`` accepts by their shape are
sent (the engine sends KV chunks: vision features are never read back from below, and are just dropped).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch

from qwen3vl_ray.errors import CapacityError
from qwen3vl_ray.keys import CacheKey

logger = logging.getLogger(__name__)


class TierBelow(Protocol):
    """A tier below the store, in another process (the node agent's host tier on the Ray path). Batched: one
    call per batch crosses the process boundary."""

    def contains_many(self, keys: Sequence[CacheKey]) -> list[bool]:
        """Per key: True if the tier below already holds it."""
        ...

    def put_many(self, items: Sequence[tuple[CacheKey, torch.Tensor, CacheKey | None]]) -> list[bool]:
        """Store ``(key, tensor, parent)`` items; per item: True if it is held below afterwards."""
        ...

    def get_many(self, keys: Sequence[CacheKey]) -> list[torch.Tensor | None]:
        """Tensors of ``keys`` (None where the tier below lacks one)."""
        ...


def device_tier(store: Any) -> Any | None:
    """The store's device tier object, or None when it has none."""
    for tier in getattr(store, "tiers", []):
        if getattr(tier, "name", None) == "device":
            return tier
    return None


def _parents_first(keys: Sequence[CacheKey], parents: dict[CacheKey, CacheKey | None]) -> list[CacheKey]:
    """``keys`` with every key after its chain parent where both are there, otherwise in their order. Victims
    come tail first (idle sessions from their tails, the policy leaf-first); a tier below that cannot take a whole
    batch keeps its head (the last tier's rule), which must then be the chains' heads, not their tails."""
    out: list[CacheKey] = []
    placed: set[CacheKey] = set()
    for key in keys:
        line = []
        while key is not None and key in parents and key not in placed:  # up to an ancestor placed or absent
            placed.add(key)
            line.append(key)
            key = parents[key]
        out += reversed(line)
    return out


class DeviceBudget:
    """Keeps (device tier bytes + running request's KV bytes) within ``budget_bytes``.

    ``idle_keys``: the keys of idle sessions, most idle first (they leave the device first).
    ``below``: the tier under a store whose last tier is the device tier (set by the Ray worker; None in one
    process, where the store's own lower tiers take demotions). ``hand_down(shape)``: whether an entry of this
    stored shape is sent ``below`` (default: every entry)."""

    def __init__(self, store: Any, budget_bytes: int, idle_keys: Callable[[], Iterable[CacheKey]],
                 below: TierBelow | None = None, hand_down: Callable[[tuple[int, ...]], bool] | None = None):
        self.store = store
        self.budget_bytes = budget_bytes
        self._idle_keys = idle_keys
        self.below = below
        self.hand_down = hand_down if hand_down is not None else (lambda shape: True)
        self.demoted = 0
        self.spilled = 0  # entries handed to ``below`` (it lacked them)
        self.spilled_bytes = 0
        self.lost = 0  # entries dropped because ``below`` could not take them

    def used_bytes(self) -> int:
        tier = device_tier(self.store)
        return int(tier.used_bytes) if tier is not None else 0

    def check(self, need_bytes: int, what: str) -> None:
        """Raise CapacityError if ``need_bytes`` of live KV can never fit the budget."""
        if need_bytes > self.budget_bytes:
            raise CapacityError(
                f"{what} needs {need_bytes} bytes of KV on the device but kv_device_budget_bytes is "
                f"{self.budget_bytes}, even with every cached entry offloaded; shorten the prompt, lower "
                f"max_new_tokens or raise the budget"
            )

    def make_room(self, need_bytes: int, protect: Iterable[CacheKey] = ()) -> bool:
        """Demote device-resident entries until ``need_bytes`` fits next to the device tier. True if it fits."""
        tier = device_tier(self.store)
        below = self.below is not None and tier is not None and self.store.tiers[-1] is tier
        protected = set(protect)
        store_bytes = None
        if below:
            # the request stores its KV but the chunks of it the tier already holds (its staged prefix)
            store_bytes = max(0, need_bytes - sum(tier.entry_nbytes(k) or 0 for k in protected))
        if self._over(need_bytes, tier, store_bytes) <= 0:
            return True
        t0 = time.perf_counter()
        before = self.demoted
        # the request's own prefix stays: pinned entries are never victims, in the store's walks or ours
        with self.store.pinned(protected):
            if below:
                self._spill(need_bytes, store_bytes, tier, protected)
            else:
                self._demote(need_bytes, tier, protected)
        fits = self.used_bytes() + need_bytes <= self.budget_bytes
        logger.info("device pressure: demoted %d entries in %.1f ms (fits=%s)", self.demoted - before,
                    1e3 * (time.perf_counter() - t0), fits)
        return fits

    def _over(self, need_bytes: int, tier: Any, store_bytes: int | None) -> int:
        """Bytes to free before a request of ``need_bytes`` live KV. With a tier below, also room in the device
        tier for the ``store_bytes`` the request will store there: the tier's own eviction drops (the store
        has no tier under it), so the budget hands victims down first. A device tier smaller than the budget
        (the default: 256 MiB of a 1 GiB budget) would otherwise lose session tails on full puts."""
        used = self.used_bytes()
        over = used + need_bytes - self.budget_bytes
        if store_bytes is not None:
            cap = int(tier.capacity_bytes)
            over = max(over, used + min(store_bytes, cap) - cap)
        return over

    def _demote(self, need_bytes: int, tier: Any, protected: set[CacheKey]) -> None:
        """Idle sessions' device entries down the store's own tiers one at a time, then the device tier's
        policy victims (``relieve``) until ``need_bytes`` fits."""
        for key in self._idle_on_device(protected):
            if self.used_bytes() + need_bytes <= self.budget_bytes:
                return
            if self.store.demote(key):
                self.demoted += 1
        if self.used_bytes() + need_bytes > self.budget_bytes:
            before = len(tier)
            self.store.relieve(tier.name, self.budget_bytes - need_bytes)
            self.demoted += max(0, before - len(tier))

    def _spill(self, need_bytes: int, store_bytes: int, tier: Any, protected: set[CacheKey]) -> None:
        """Hand victims down in batches until ``need_bytes`` fits: idle sessions' entries first, then the device
        tier policy's victims for what is still over; another batch when some would not leave (being read)."""
        tried = set(protected)
        while (over := self._over(need_bytes, tier, store_bytes)) > 0:
            victims: list[CacheKey] = []
            freeing = 0
            for key in self._idle_on_device(tried):
                if freeing >= over:
                    break
                victims.append(key)
                freeing += tier.entry_nbytes(key) or 0
            if freeing < over:
                victims += self.store.victims(tier.name, over - freeing, skip=tried.union(victims))
            if not victims:
                return
            tried.update(victims)
            self._hand_down(victims, tier)

    def _hand_down(self, victims: list[CacheKey], tier: Any) -> None:
        """Send the victims ``below`` lacks to it in one batch, with their chain parents, then drop their device
        copies (a demotion out of the store's last tier). Entries ``hand_down`` refuses (the engine's vision
        features) are just dropped: nothing reads them from below, and the encoder recomputes them."""
        kv = [k for k in victims if self.hand_down(tier.entry_shape(k) or ())]
        sent = set(kv)
        try:
            held = dict(zip(kv, (bool(h) for h in self.below.contains_many(kv)))) if kv else {}
        except Exception:  # a tier below that does not answer holds nothing we can count on
            logger.warning("tier below unreachable; sending all %d victims", len(kv), exc_info=True)
            held = {}
        # Read through the tier, not the store: a hand-down is not a hit (requests run one at a time, so
        # nothing moves the entry meanwhile). Parents are the store's record of each entry's chain.
        send = [k for k in kv if not held.get(k)]
        parents = dict(zip(send, self.store.parents(send)))
        items = [(k, t, parents[k]) for k in _parents_first(send, parents) for t in [tier.get(k)] if t is not None]
        ok: dict[CacheKey, bool] = {}
        if items:
            try:
                ok = dict(zip((k for k, _, _ in items), (bool(x) for x in self.below.put_many(items))))
            except Exception:
                logger.warning("handing %d entries to the tier below failed", len(items), exc_info=True)
        sizes = {k: t.numel() * t.element_size() for k, t, _ in items}
        lost = 0
        for key in victims:
            if not self.store.demote(key):  # pinned or being read: it stays (a copy below is harmless)
                continue
            self.demoted += 1
            if ok.get(key, False):
                self.spilled += 1
                self.spilled_bytes += sizes[key]
            elif key in sent and not held.get(key):
                lost += 1
        if lost:
            self.lost += lost
            logger.warning("device pressure: %d of %d demoted entries dropped (the tier below refused them; "
                           "%d lost so far)", lost, len(victims), self.lost)

    def _idle_on_device(self, skip: set[CacheKey]) -> Iterator[CacheKey]:
        """Idle sessions' keys that the store holds on the device tier, most idle session first, less ``skip``
        (read lazily: a caller that stops early looks up no further)."""
        for key in self._idle_keys():
            if key not in skip and self.store.where(key) == "device":
                yield key
