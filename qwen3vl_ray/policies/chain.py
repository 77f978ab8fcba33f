"""Chain-level 2Q with ARC-style adaptation (``chain-arc``): leaf-first, and a block's class is its chain's.

Metadata side only. Prefix-2Q (``prefix.py``) asks "was this *block* seen before?". For KV chains the
better question is "has this *chain* come back?": on the Mooncake trace a chain head seen for the first
time is followed by another request on the same chain 18% of the time, one that has come back before 80%
of the time, and the new tail blocks a returning conversation appends are first-time blocks that the next
turn reuses. So here:

- A chain head (or an orphan, the first block this tier sees of a chain) is *hot* if a doorkeeper
  (``Doorkeeper``: TinyLFU's Bloom filter, Einziger et al., ACM ToS 2017) saw the same head within the last
  ``window_factor`` x entries .. twice that many chain starts; else *cold*. Every other block inherits its
  parent's class when it is inserted, and a hit makes a block hot. One byte of state, no per-chain table.
- Order is 2Q's (Johnson & Shasha, VLDB 1994) made soft: a cold block ranks as if last used
  ``penalty`` x entries accesses earlier than it was, so cold chains go first unless the hot ones are much
  older; within that ranking eviction is leaf-first (``PrefixLRUPolicy``), so a kept chain stays usable.
- ``penalty`` adapts as ARC's target size does (Megiddo & Modha, FAST 2003): two ghost lists remember the
  blocks this tier evicted or demoted from each class (its own choices; a block promoted because it was hit
  or deleted by a caller is not remembered) in two-generation Bloom filters, about one tier's worth of
  evictions each, so a few bytes per entry instead of ARC's ghost keys. A miss on a block the *cold* ghost remembers
  says cold blocks were dropped too early and lowers the penalty; a miss the *hot* ghost remembers raises
  it. As in ARC, each step is scaled by the ratio of the two ghosts' sizes (decayed eviction counts), so the
  smaller class's ghost hits weigh more. The penalty stays in [0, ``max_penalty``]; at 0 this is
  leaf-first LRU, at ``max_penalty`` nearly strict "cold first".

Measured with ``python -m benchmarks.policy`` (a replay through the store): never below LRU on the Mooncake
trace and the synthetic Zipf / scan / multi-turn traces, at or above ``prefix-2q`` everywhere but Mooncake @ 10k
blocks (0.4337 vs 0.4355; LRU 0.4236) and multi-turn @ 788 (0.6752 vs 0.6753). Mooncake @ 3k: 0.2027 (LRU
0.1876, Belady 0.4467); Zipf @ 239: 0.3169 (LRU 0.2663, Belady 0.4796); Zipf+scan @ 613: 0.2016 (LRU 0.1384,
Belady 0.3095). With the policy-only replay used before (no store; 0.2045 @ 3k), ``step`` (4 or 8) and
``window_factor`` (4 or 8) moved these by < 0.005 and ``ghost_factor`` 2 was worse.

Tried and not kept (Mooncake @ 3k, policy-only replay): strict cold-first 0.203 (0.599 @ 30k, below LRU);
per-chain request count as a bonus <= 0.198; LHD-style hit density by (chain count, age) 0.201; random chain
admission worse than LRU; ranking hot chains by their head's mean request gap 0.215 (0.380 on Zipf @ 239) but
below LRU on multi-turn, whose chain heads are system prompts shared by many chats.
"""

from __future__ import annotations

from qwen3vl_ray.keys import CacheKey
from qwen3vl_ray.policies.doorkeeper import Doorkeeper
from qwen3vl_ray.policies.prefix import ClassedPrefixPolicy, PrefixRecord, _live
from qwen3vl_ray.policies.record import EntryRecord

_MIN_WINDOW = 1024  # keys; the Bloom filters never shrink below this, so tiny tiers still remember a little


class ChainARCPolicy(ClassedPrefixPolicy):
    """Leaf-first eviction, cold chains before hot ones by an adaptive margin (see the module docstring)."""

    name = "chain-arc"

    def __init__(self, penalty: float = 1.0, max_penalty: float = 16.0, step: float = 8.0,
                 window_factor: float = 4.0, ghost_factor: float = 1.0) -> None:
        if not 0.0 <= penalty <= max_penalty:
            raise ValueError(f"need 0 <= penalty <= max_penalty (entries), got penalty={penalty}, "
                             f"max_penalty={max_penalty}")
        if not step >= 0:
            raise ValueError(f"step must be >= 0 (entries of penalty per ghost hit), got {step}")
        for name, value in (("window_factor", window_factor), ("ghost_factor", ghost_factor)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 (multiple of the entry count), got {value}")
        super().__init__()
        self.penalty = penalty
        self._max_penalty = max_penalty
        self._step = step
        self._window_factor = window_factor
        self._ghost_factor = ghost_factor
        self._heads = Doorkeeper(_MIN_WINDOW)  # chain starts seen recently
        self._ghost_cold = Doorkeeper(_MIN_WINDOW)  # blocks evicted while cold
        self._ghost_hot = Doorkeeper(_MIN_WINDOW)  # blocks evicted while hot
        # Decayed eviction counts per class: the two ghosts' sizes, for ARC's step ratio. Start equal.
        self._evicted_cold = 1.0
        self._evicted_hot = 1.0

    def _entries(self) -> int:
        return max(1, self._count)

    # ``ClassedPrefixRecord.heat`` is the class: 0 = cold, >= 1 = hot (came back, inherited, or hit here).
    def _priority(self, node: PrefixRecord) -> int:
        if node.heat:
            return self._clock
        return self._clock - int(self.penalty * self._count)

    def miss(self, key: CacheKey) -> None:
        if key in self._ghost_cold:
            ratio = max(1.0, self._evicted_hot / self._evicted_cold)
            self.penalty = max(0.0, self.penalty - self._step * ratio / self._entries())
        elif key in self._ghost_hot:
            ratio = max(1.0, self._evicted_cold / self._evicted_hot)
            self.penalty = min(self._max_penalty, self.penalty + self._step * ratio / self._entries())

    def _on_new(self, node: PrefixRecord) -> None:
        up = node.up
        if isinstance(up, PrefixRecord):  # continues a cached chain: same class as the block before it
            node.heat = 1 if up.heat else 0
            return
        window = max(_MIN_WINDOW, int(self._window_factor * self._count))
        node.heat = 1 if self._heads.seen_then_add(node.key, window) else 0

    def evict(self, rec: EntryRecord) -> None:
        self._ghost(rec)
        super().evict(rec)

    def demote(self, rec: EntryRecord) -> None:
        # leaving for the tier below is this tier's eviction: the same choice, judged by the same ghosts
        self._ghost(rec)
        super().demote(rec)

    # on_promote and on_delete only forget: a block that left because it was hit, or that a caller removed, says
    # nothing about whether this policy chose its victims well (counting them skewed the ghosts and the ratio)

    def _ghost(self, rec: EntryRecord) -> None:
        """Remember ``rec``'s key in its class's ghost list and count the eviction for ARC's step ratio."""
        node: PrefixRecord = rec  # type: ignore[assignment]
        if not _live(node):
            return
        key = node.key
        decay = 1.0 - 1.0 / max(_MIN_WINDOW, self._count)  # counts follow about one tier of evictions
        self._evicted_cold *= decay
        self._evicted_hot *= decay
        window = max(_MIN_WINDOW, int(self._ghost_factor * self._count))
        if node.heat:
            self._evicted_hot += 1.0
            self._ghost_hot.seen_then_add(key, window)
        else:
            self._evicted_cold += 1.0
            self._ghost_cold.seen_then_add(key, window)

    @property
    def filters_nbytes(self) -> int:
        """Bytes of the three Bloom filters (chain heads, cold ghost, hot ghost)."""
        return self._heads.nbytes + self._ghost_cold.nbytes + self._ghost_hot.nbytes
