"""The store's one metadata record of an entry in one tier, with room for its tier policy's fields.

vLLM keeps a block's free-queue links in the block itself (``KVCacheBlock.prev_free_block``); the same here:
a policy declares the fields it keeps per entry as slots of a subclass (``EvictionPolicy.record_type``) and
the store makes each entry's record of that class, so an entry costs one object and one index slot for the
store and its policy together, not one each (the per-entry metadata budget is 256 B, tier index included).

A record is one *stay* of an entry in one tier: the store asks the tier's policy for a record each time the
entry arrives there (``EvictionPolicy.new_record``), so a policy that leaves a departed record in a structure
of its own (a heap, a parent link) recognises it by its own marks and never mistakes it for the entry's stay in
another tier. A policy may hand back a departed record of its own tier for the entry's next stay there (the
prefix policies do, for a parent whose children stayed: they still point at it).
"""

from __future__ import annotations

from qwen3vl_ray.keys import CacheKey


class EntryRecord:
    """What the store knows of one entry in one tier (metadata only; the bytes are the tier's).

    ``last_access`` points at a float shared by every entry touched in the same second; the small counts
    (``in_flight``, ``hits``) are Python's shared small ints, so the fields cost a pointer each. The
    tier's location of the bytes is a field too (``loc``), so an addressed tier keeps no index of its own."""

    __slots__ = ("key", "tier", "parent", "last_access", "in_flight", "hits", "loc", "spec")

    def __init__(self, key: CacheKey, tier: int, parent: CacheKey | None, last_access: float,
                 in_flight: int = 0, hits: int = 0) -> None:
        self.key = key
        self.tier = tier  # position of the tier in the store's list
        self.parent = parent  # the chunk before it in its chain (None: a chain's head, or not a chain)
        self.last_access = last_access  # ``time.monotonic()`` of its last store or read, whole seconds
        self.in_flight = in_flight  # reads and writes of its bytes under way: never a victim while > 0
        self.hits = hits  # reads of this value since it was stored (a node agent ranks entries by it)
        # Where its bytes are, for a tier that is addressed storage (``Tier.addressed``: the pooled tiers): the
        # tier's location of them (None until they are written, and once they are freed) and the tier's
        # interned description of them (dtype, shape, encoded). Other tiers index the bytes by key themselves.
        self.loc = None
        self.spec = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key.hex()[:8]}, tier={self.tier})"
