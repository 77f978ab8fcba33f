"""An entry's bytes on their way into a tier while the cache's metadata lock is free (the data side of a store).

A store runs in rounds (``TieredCache._finish_writes``): the entry is indexed and marked in flight under the
lock, then encoded outside it (a demotion's victim), room is held in the destination under it, the bytes
are written outside it (a memcpy, or a file write and fsync), and the entry is published or given up
under it. Meanwhile the entry is never replaced or removed, and a reader is served from ``tensor``, which
holds the exact bytes being written. It is never a victim either, except in the last tier before its write
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
    dst: int  # tier index the bytes go to
    tensor: torch.Tensor  # the bytes to write, served to readers meanwhile
    src: int | None = None  # the tier a demoted victim left; None for a put
    item: int | None = None  # a put's position in its batch: its result follows the write's
    prepared: PreparedStore | None = None  # None until encoded for ``dst`` (a victim is encoded outside the lock)
    res: Reservation | None = None  # None until room is held in ``dst``
    ok: bool | None = None  # the write's outcome; None: not written (no room, or refused by the codec)
    cancelled: bool = False  # evicted from the last tier before its write started: nothing to write
    replaced: Any = None  # the index record of the value a put falls back to if this write fails (its bytes stay put)
