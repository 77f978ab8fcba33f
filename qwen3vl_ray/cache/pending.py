"""An entry's bytes on their way into a tier while the cache's metadata lock is free (the data side of a store).

A store runs in rounds (``movers.DataMovers``): the entry is indexed and marked in flight under the
lock; a demoted victim's bytes are read out of the tier it leaves (``source``) and encoded outside it; room is
held in the destination under it; the bytes are written outside it (a memcpy, or a file write and fsync); and
the entry is published or given up under it. A victim no room can be made for in its destination goes on to
the tier below in the next round (``dst`` and ``entry`` change then). Meanwhile the entry is never replaced or
removed, and a reader is served from ``tensor``, which holds the exact bytes being written (before a victim
is read out, from where its bytes still are). It is never a victim either, except in the last tier before its write
starts: evicting it there only cancels the write (what the policy would have done to a written entry), so
victims demoted together still leave by the policy's order, heads of chains kept before tails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qwen3vl_ray.keys import CacheKey
from qwen3vl_ray.tiers.base import PreparedStore, Reservation


@dataclass(slots=True)
class PendingWrite:
    key: CacheKey
    entry: Any  # the cache's index record of ``key`` (in flight until the write is finished)
    dst: int  # tier index the bytes go to (a victim passed on down: the tier it goes to now)
    tensor: torch.Tensor | None  # the bytes to write, served to readers meanwhile (None: a victim not read out yet)
    src: int | None = None  # the tier a demoted victim left or a promoted entry comes from; None for a put
    item: int | None = None  # a put's position in its batch: its result follows the write's
    prepared: PreparedStore | None = None  # None until encoded for ``dst`` (a victim is encoded outside the lock)
    res: Reservation | None = None  # None until room is held in ``dst``
    ok: bool | None = None  # the write's outcome; None: not written (no room, or refused by the codec)
    cancelled: bool = False  # evicted from the last tier before its write started: nothing to write
    source: Any = None  # a victim's record in the tier it leaves, whose bytes the rounds read out (then None)
    waits: int = 0  # rounds this write has waited for its room to be vacated
    # the index record of the value a put or promotion falls back to if this write fails (its bytes stay put)
    replaced: Any = None

    @property
    def is_promotion(self) -> bool:
        """The write moves an entry up (``TierManager._stage_promotion``); ``replaced`` is its stay below."""
        return self.src is not None and self.src > self.dst
