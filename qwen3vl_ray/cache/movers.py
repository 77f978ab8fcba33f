"""The data movers: the byte side of every move between a tiered cache's tiers, run outside its metadata lock.

``TieredCache`` (the metadata side) plans each move under its lock, as vLLM's offloading manager plans a
transfer and its workers copy it (``vllm/v1/kv_offload``): the entry is indexed where it goes, in flight, and
the movers get one ``PendingWrite`` (``pending.py``) per entry: a put, a promotion or a demoted victim. They
run them in rounds, each step that needs the metadata handed back to the cache through a hook that takes its
lock:

1. read each victim's bytes out of the tier it leaves (its old record, the write's ``source``, holds them
   there until now; readers meanwhile read them there);
2. ``sources_read``: the cache serves readers from the copy and gives the old room back (freed by the last
   reader if one is still reading);
3. encode each victim for the tier it goes to (a codec may take a while);
4. ``rooms_held``: the cache holds room for every write that has none yet; making room in a tier above the
   last stages that tier's own victims for the next round, a write whose room is still being vacated waits for
   the next round, and a victim its tier cannot take goes on to the tier below in the next round;
5. write every entry's bytes, one batch per tier (memcpys, file writes and fsyncs; the Ray object-store tier
   puts a batch as one object);
6. ``writes_done``: the cache commits what was written and publishes or gives up each entry.

Every round's new writes go at least one tier further down than the writes that made them (or wait for room
a bounded number of rounds), so the rounds end. An exception stops them: ``writes_done`` settles the writes
staged for a later round (a victim that cannot be written leaves the cache; a put or promotion keeps the
value it replaces).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from qwen3vl_ray.cache.pending import PendingWrite
from qwen3vl_ray.errors import CapacityError, CodecError
from qwen3vl_ray.tiers.base import Tier

log = logging.getLogger(__name__)


class DataMovers:
    """Runs a tiered cache's planned writes (see the module docstring). Holds no state between calls and no
    lock: ``read`` copies through the tier's own lock, and each hook takes the cache's.

    Args:
        tiers: the cache's tiers, top first (``PendingWrite.dst`` indexes them).
        read: the bytes of an entry at a record's location (None: gone or corrupt).
        sources_read: step 2 for the writes whose source was read out this round.
        rooms_held: step 4; appends the writes that go on to the next round to its ``later`` argument (this
            round's that wait or are passed on down, and the victims it stages).
        writes_done: step 6 for this round's writes that do not go on, and for the writes an exception kept
            from their round (nothing written: each is given up).
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        read: Callable[[object], torch.Tensor | None],
        sources_read: Callable[[Sequence[PendingWrite]], None],
        rooms_held: Callable[[Sequence[PendingWrite], list[PendingWrite]], None],
        writes_done: Callable[[Sequence[PendingWrite]], None],
    ) -> None:
        self.tiers = tiers
        self._read = read
        self._sources_read = sources_read
        self._rooms_held = rooms_held
        self._writes_done = writes_done

    def run(self, writes: Sequence[PendingWrite]) -> None:
        """Run ``writes`` and everything they lead to, round after round, until none is left."""
        later = list(writes)
        try:
            while later:
                this_round, later = later, []
                self._round(this_round, later)
        finally:
            if later:  # an exception stopped the rounds: the writes staged for the next one are given up
                self._writes_done(later)

    def _round(self, writes: list[PendingWrite], later: list[PendingWrite]) -> None:
        try:
            unread = [(w, w.source) for w in writes if w.source is not None and not w.cancelled]
            for w, source in unread:
                # where its bytes still are (None: lost or corrupt there, or freed by a call-off meanwhile: a
                # tier frees and copies under its own lock, so a read never sees reused blocks)
                w.tensor = self._read(source)
            if unread:
                self._sources_read([w for w, _ in unread])  # the old room goes back before the encode
            for w in writes:
                if w.prepared is None and w.tensor is not None and not w.cancelled:
                    try:
                        w.prepared = self.tiers[w.dst].prepare_store(w.key, w.tensor)
                    except (CapacityError, CodecError) as exc:
                        # too big for that tier, or its codec refuses the tensor: ``rooms_held`` sends it on down
                        log.debug("entry %s cannot move to tier %s: %s", w.key.hex()[:8], self.tiers[w.dst].name, exc)
            self._rooms_held(writes, later)
            passed = {id(w) for w in later}
            for i, tier in enumerate(self.tiers):
                going = [w for w in writes
                         if w.dst == i and w.res is not None and not w.cancelled and id(w) not in passed]
                if going:
                    for w, ok in zip(going, tier.write_many([w.res for w in going])):
                        w.ok = ok  # recorded as each lands: an exception later still commits what was written
        finally:
            passed = {id(w) for w in later}  # this round's writes that go on are settled in a later round
            self._writes_done([w for w in writes if id(w) not in passed])
