"""Return-time prediction per chain on top of ``chain-arc`` (``prefix-return``): leaf-first, cold chains before
hot ones by an adaptive margin, and among hot chains the one expected back last goes first.

Metadata side only. Belady's MIN evicts the block whose next use is furthest away; an online policy can only
guess that time. For prefix KV the unit to guess it for is the *chain* (a conversation, a document): every
request that uses a block passes through the first block of its chain, so the gaps between touches of a
chain's first block are the chain's request gaps, measured in the policy's logical clock (block accesses, so
the estimate is on the same scale as recency). Each chain keeps an exponentially weighted mean of its gaps,
taken in log space (the gaps are heavy-tailed: a geometric mean, which one outlier does not swamp), and a
block of a hot chain ranks as

    priority = last use - min(weight x max(0, predicted gap - free x entries), penalty x entries)

(lower = evicted sooner): "age + predicted gap" order, the Belady-like step a monotone priority allows. A
chain that comes back every few hundred accesses outlives one of the same recency that comes back every ten
thousand, whose next use lies beyond what the tier can hold anyway. ``last use + gap`` itself (MIN's order)
is not monotone in the clock (a use would move a block *towards* eviction, which the leaf heap of
``PrefixLRUPolicy`` cannot keep in O(log n)), and once a chain is overdue its predicted return says little,
so recency keeps counting. The gap term is capped at the cold penalty, so a hot chain never ranks below a cold
chain of the same recency (and it vanishes while ``chain-arc``'s adaptation holds that penalty at 0).

Everything else is ``chain-arc`` (``ChainARCPolicy``): cold = a chain whose first block the head doorkeeper
has not seen and that has not come back; cold blocks rank ``penalty`` x entries accesses below recency, and
``penalty`` adapts from the two ghost filters as ARC's target does.

What a chain is here: a block continues its parent's chain when it is its parent's only cached child, and
starts a new chain when it has no cached parent or when its parent already has a cached child (a branch: two
conversations on one shared system prompt are two chains, each with its own gaps; the new one is hot if the
branch point's chain is, as in ``chain-arc``). Per-chain state is one small record (``_Chain``) shared by the
chain's blocks: ``ClassedPrefixRecord.heat`` holds a reference to it (no per-block field is added) and its truth is
``chain-arc``'s class. The table of live chains is keyed by first block and drops a chain's record when its
first block leaves the tier; if it left by this tier's choice (evicted or demoted), the record moves to a
history table bounded to ``history_factor`` x the live chains (at least 1,024, oldest out first), so that a
chain coming back after its blocks were evicted has its gap measured. On the Mooncake trace a chain comes back
after a median ~226 requests (~7k block accesses), beyond a 3k-block tier, so without that table almost no
chain would ever be seen returning.

Order within the ranking is leaf-first, so a kept chain is always a usable prefix, and every operation stays
O(log n) amortized. Measured results, the variants tried and why it wins where it does: ``docs/policies.md``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from qwen3vl_ray.keys import CacheKey
from qwen3vl_ray.policies.chain import _MIN_WINDOW, ChainARCPolicy
from qwen3vl_ray.policies.prefix import PrefixRecord, _live
from qwen3vl_ray.policies.record import EntryRecord

_MIN_HISTORY = 1024  # chain records the history table may hold however small the tier


class _Chain:
    """One chain's state: its first block's key, the clock of its last request, the mean log gap between its
    requests (None until it has come back), how many times it came back, and ``chain-arc``'s class."""

    __slots__ = ("head", "last", "log_gap", "returns", "hot")

    def __init__(self, head: CacheKey, last: int, hot: bool) -> None:
        self.head = head
        self.last = last
        self.log_gap: float | None = None
        self.returns = 0
        self.hot = hot

    def __bool__(self) -> bool:  # ``ChainARCPolicy`` reads ``if node.heat`` as "hot"
        return self.hot

    def returned(self, now: int, alpha: float) -> None:
        """A new request on this chain at clock ``now``: fold its gap into the estimate; the chain is hot."""
        x = math.log(max(1, now - self.last))
        self.log_gap = x if self.log_gap is None else self.log_gap + alpha * (x - self.log_gap)
        self.returns += 1
        self.last = now
        self.hot = True

    @property
    def gap(self) -> float | None:
        """The predicted gap to the chain's next request, in block accesses (None: it has not come back)."""
        return None if self.log_gap is None else math.exp(self.log_gap)


class PrefixReturnPolicy(ChainARCPolicy):
    """``chain-arc`` with hot chains ranked by last use minus their predicted return gap (module docstring)."""

    name = "prefix-return"

    def __init__(self, weight: float = 0.25, free: float = 0.0, alpha: float = 0.5, history_factor: float = 4.0,
                 **chain_arc) -> None:
        for name, value in (("weight", weight), ("free", free), ("history_factor", history_factor)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1] (the newest gap's weight), got {alpha}")
        super().__init__(**chain_arc)
        self._weight = weight
        self._free = free
        self._alpha = alpha
        self._history_factor = history_factor
        self._chains: dict[CacheKey, _Chain] = {}  # live chains by their first block's key
        self._history: OrderedDict[CacheKey, _Chain] = OrderedDict()  # chains this tier evicted, oldest first

    # ``ClassedPrefixRecord.heat`` holds the record's ``_Chain``, shared by every block of the chain.
    def _priority(self, node: PrefixRecord) -> int:
        chain: _Chain = node.heat
        n = self._count
        cold = self.penalty * n
        if not chain.hot:
            return self._clock - int(cold)
        if chain.log_gap is None:
            return self._clock
        late = self._weight * max(0.0, math.exp(chain.log_gap) - self._free * n)
        return self._clock - int(min(late, cold))

    def _touch(self, node: PrefixRecord) -> None:
        chain: _Chain = node.heat
        if chain.head is node.key and chain.last != self._clock + 1:
            # the chain's first block: every request on the chain passes here first, so the chain is back
            chain.returned(self._clock + 1, self._alpha)
        super()._touch(node)

    def _on_new(self, node: PrefixRecord) -> None:
        up = node.up
        if isinstance(up, PrefixRecord) and up.children == 1:  # its parent's only cached child: the chain goes on
            node.heat = up.heat
            return
        if isinstance(up, PrefixRecord):  # a branch: a new chain, of the branch point's class (as chain-arc)
            hot = bool(up.heat)
        else:  # a chain head or an orphan: hot if the head doorkeeper saw it recently (as chain-arc)
            hot = self._heads.seen_then_add(node.key, max(_MIN_WINDOW, int(self._window_factor * self._count)))
        chain = self._history.pop(node.key, None)
        if chain is not None:  # a chain this tier evicted comes back: resume its record (it is hot now)
            chain.head = node.key
            chain.returned(self._clock + 1, self._alpha)
        else:
            chain = _Chain(node.key, self._clock + 1, hot)
        self._chains[node.key] = chain
        node.heat = chain

    def hit(self, rec: EntryRecord) -> None:
        if _live(rec):  # type: ignore[arg-type]
            self._touch(rec)  # type: ignore[arg-type]  # not PrefixLRUPolicy's hit count: ``heat`` is the chain here

    def _ghost(self, rec: EntryRecord) -> None:
        # evicted or demoted (this tier's choice): chain-arc's ghosts, and a first block's chain goes to history
        super()._ghost(rec)
        key = rec.key
        chain = self._chains.get(key)
        if chain is None or not _live(rec) or rec.heat is not chain:  # type: ignore[arg-type, attr-defined]
            return
        self._history[key] = self._chains.pop(key)
        limit = max(_MIN_HISTORY, int(self._history_factor * len(self._chains)))
        while len(self._history) > limit:
            self._history.popitem(last=False)

    def _on_gone(self, node: PrefixRecord) -> None:
        # a first block that leaves for another reason (promoted, deleted) takes its chain's record with it
        if self._chains.get(node.key) is node.heat:
            del self._chains[node.key]

    def chain_of(self, key: CacheKey) -> _Chain | None:
        """Standalone use: the chain record of a cached ``key`` (None if the key is not here)."""
        node = self.record_of(key)
        return None if node is None else node.heat  # type: ignore[attr-defined]

    @property
    def chains(self) -> int:
        """Live chain records: one per cached chain start."""
        return len(self._chains)

    @property
    def history(self) -> int:
        """Records of chains whose first block this tier evicted, kept to measure their return."""
        return len(self._history)
