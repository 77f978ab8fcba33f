"""Property test: under any sequence of store operations each tier's policy is told exactly what its tier holds.

Every tier's policy keeps a ledger from its events alone: ``insert`` adds a key, each way out (evict,
demote, promote, delete) takes one away. After every step the ledger equals the keys the cache indexes in
that tier, no way out names a key the ledger does not hold, the top tier is never told of a promotion nor the
last of a demotion, and the evictions the policies heard are the entries the cache dropped.
"""

import shutil
import tempfile

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.keys import Namespace, prefix_key
from qwen3vl_ray.policies import PrefixLRUPolicy
from qwen3vl_ray.tiers.config import TierConfig

NS = Namespace(model="prop-events")
KEYS = [prefix_key(NS, None, [i]) for i in range(12)]


class Ledger(PrefixLRUPolicy):
    """Leaf-first LRU that keeps the set of keys its events say the tier holds, and counts each way out."""

    def __init__(self) -> None:
        super().__init__()
        self.held: set[bytes] = set()
        self.out = {"evict": 0, "demote": 0, "promote": 0, "delete": 0}
        self.unknown: list[tuple[str, bytes]] = []  # ways out of keys the tier was never told it holds

    def insert(self, rec, nbytes, up=None):
        self.held.add(rec.key)
        super().insert(rec, nbytes, up)

    def _left(self, event: str, key) -> None:
        if key not in self.held:
            self.unknown.append((event, key))
        self.held.discard(key)
        self.out[event] += 1

    def evict(self, rec):
        self._left("evict", rec.key)
        super().evict(rec)

    def demote(self, rec):
        self._left("demote", rec.key)
        super().demote(rec)

    def promote(self, rec):
        self._left("promote", rec.key)
        super().promote(rec)

    def delete(self, rec):
        self._left("delete", rec.key)
        super().delete(rec)


class EventsMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.ledgers = [Ledger(), Ledger(), Ledger()]
        self.cache = TieredCache(CacheConfig(
            tiers=[
                TierConfig("device", 8 * 1024, device="cpu", block_bytes=256),
                TierConfig("host", 16 * 1024, block_bytes=256),
                TierConfig("disk", 24 * 1024, path=self.dir, fsync=False),
            ],
            namespace=NS,
            prefetch_threads=0,
        ), policies=self.ledgers)
        self.version = 0
        self.held: list[bytes] = []  # keys pinned across steps

    def teardown(self):
        self.cache.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _tensor(self, n: int) -> torch.Tensor:
        self.version += 1
        return torch.arange(n, dtype=torch.float32) * 0.5 + self.version

    @rule(k=st.integers(0, len(KEYS) - 1), n=st.integers(1, 700))
    def put(self, k, n):
        self.cache.put(KEYS[k], self._tensor(n))

    @rule(first=st.integers(0, len(KEYS) - 1), m=st.integers(1, 8))
    def put_prompt(self, first, m):
        # one request's chained chunks in one batch, enough to fill device and host together
        ks = [KEYS[(first + j) % len(KEYS)] for j in range(m)]
        self.cache.put_many([(k, self._tensor(700), ks[j - 1] if j else None) for j, k in enumerate(ks)])

    @rule(k=st.integers(0, len(KEYS) - 1), promote=st.booleans())
    def lookup(self, k, promote):
        self.cache.lookup(KEYS[k], promote=promote)

    @rule(k=st.integers(0, len(KEYS) - 1))
    def remove(self, k):
        self.cache.remove(KEYS[k])

    @rule(k=st.integers(0, len(KEYS) - 1))
    def demote(self, k):
        self.cache.demote(KEYS[k])

    @rule(tier=st.sampled_from(["device", "host", "disk"]), to_bytes=st.integers(0, 16 * 1024))
    def relieve(self, tier, to_bytes):
        self.cache.relieve(tier, to_bytes)

    @rule()
    def expire_all(self):
        self.cache.expire_idle(ttl_s=1.0, now=float("inf"))

    @rule(k=st.integers(0, len(KEYS) - 1))
    def pin(self, k):
        if len(self.held) < 2 and self.cache.pin(KEYS[k]):
            self.held.append(KEYS[k])

    @rule()
    def unpin(self):
        if self.held:
            self.cache.unpin(self.held.pop(0))

    @invariant()
    def each_policy_holds_what_its_tier_holds(self):
        where = {k: self.cache.where(k) for k in self.cache.keys()}
        for name, ledger in zip(self.cache.tier_names, self.ledgers):
            assert ledger.held == {k for k, w in where.items() if w == name}, name
            assert ledger.unknown == []
            assert len(ledger) == len(ledger.held)
        assert self.ledgers[0].out["promote"] == 0 and self.ledgers[-1].out["demote"] == 0
        assert sum(ledger.out["evict"] for ledger in self.ledgers) == self.cache.stats()["dropped"]


EventsMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_each_tier_policy_is_told_what_its_tier_holds = EventsMachine.TestCase
