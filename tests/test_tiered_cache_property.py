"""Property test: the tiered cache against a reference dict, under any sequence of operations.

Invariants: ``get`` returns None or exactly what was last put under that key (never another key's data,
never a torn copy); no tier ever holds more bytes than its budget; the index agrees with the tiers; nothing
is dropped above the last tier while the last tier can make room (entries held pinned across steps, as a
prompt being read, never sit in the last tier here, so it always can). One rule runs a batched store and
reads plus a put from two threads at once (demotions into the disk tier are written outside the cache's
lock): a read then returns None, the old value or the new one, and the invariants hold after both finish.
"""

import shutil
import tempfile
import threading

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.keys import Namespace, prefix_key
from qwen3vl_ray.tiers.config import TierConfig

NS = Namespace(model="prop")
KEYS = [prefix_key(NS, None, [i]) for i in range(12)]


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.cache = TieredCache(CacheConfig(
            tiers=[
                TierConfig("device", 8 * 1024, device="cpu", block_bytes=256),
                TierConfig("host", 16 * 1024, block_bytes=256),
                TierConfig("disk", 24 * 1024, path=self.dir),
            ],
            namespace=NS,
            prefetch_threads=0,
        ))
        self.model: dict[bytes, torch.Tensor] = {}
        self.version = 0
        self.held: list[bytes] = []  # keys pinned across steps, most recent last

    def teardown(self):
        self.cache.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(k=st.integers(0, len(KEYS) - 1), n=st.integers(1, 700))
    def put(self, k, n):
        self.version += 1
        t = torch.arange(n, dtype=torch.float32) * 0.5 + self.version
        if self.cache.put(KEYS[k], t):
            self.model[KEYS[k]] = t
        else:
            # a failed put may not lose the previous value of this key either
            pass

    @rule(first=st.integers(0, len(KEYS) - 1), m=st.integers(1, 8))
    def put_prompt(self, first, m):
        # one request's prompt: m large chained chunks in one batch, enough to fill device and host together
        self.version += 1
        ks = [KEYS[(first + j) % len(KEYS)] for j in range(m)]
        items = [(k, torch.arange(700, dtype=torch.float32) * 0.5 + self.version + j, ks[j - 1] if j else None)
                 for j, k in enumerate(ks)]
        for (k, t, _), ok in zip(items, self.cache.put_many(items)):
            if ok:
                self.model[k] = t

    @rule(first=st.integers(0, len(KEYS) - 1), m=st.integers(1, 8),
          reads=st.lists(st.tuples(st.integers(0, len(KEYS) - 1), st.booleans()), max_size=8),
          other=st.integers(0, len(KEYS) - 1))
    def concurrent_prompt_reads_and_put(self, first, m, reads, other):
        # thread A stores a prompt in one batch; thread B reads (promoting or not) and puts another key
        self.version += 1
        ks = [KEYS[(first + j) % len(KEYS)] for j in range(m)]
        items = [(k, torch.arange(700, dtype=torch.float32) * 0.5 + self.version + j, ks[j - 1] if j else None)
                 for j, k in enumerate(ks)]
        other_key = KEYS[other] if KEYS[other] not in ks else None
        other_t = torch.arange(300, dtype=torch.float32) - self.version
        allowed = {k: [self.model.get(k)] for k in KEYS}
        for k, t, _ in items:
            allowed[k].append(t)
        if other_key is not None:
            allowed[other_key].append(other_t)
        out: dict = {}

        def store():
            out["stored"] = self.cache.put_many(items)

        def read_and_put():
            out["read"] = [(KEYS[k], self.cache.get(KEYS[k], promote=p)) for k, p in reads]
            if other_key is not None:
                out["put"] = self.cache.put(other_key, other_t)

        threads = [threading.Thread(target=store), threading.Thread(target=read_and_put)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a thread is stuck"
        for k, got in out["read"]:
            if got is not None:
                assert any(v is not None and torch.equal(got, v) for v in allowed[k]), "a read saw bytes never put"
        for (k, t, _), ok in zip(items, out["stored"]):
            if ok:
                self.model[k] = t
        if out.get("put"):
            self.model[other_key] = other_t

    @rule(k=st.integers(0, len(KEYS) - 1), promote=st.booleans())
    def get(self, k, promote):
        got = self.cache.get(KEYS[k], promote=promote)
        if got is not None:
            assert KEYS[k] in self.model, "served a key that was never stored or was removed"
            assert torch.equal(got, self.model[KEYS[k]])

    @rule(k=st.integers(0, len(KEYS) - 1))
    def remove(self, k):
        self.cache.remove(KEYS[k])
        self.model.pop(KEYS[k], None)

    @rule(ks=st.lists(st.integers(0, len(KEYS) - 1), max_size=4))
    def prefetch(self, ks):
        self.cache.prefetch([KEYS[k] for k in ks]).result()

    @rule(k=st.integers(0, len(KEYS) - 1))
    def demote(self, k):
        self.cache.demote(KEYS[k])

    @rule(k=st.integers(0, len(KEYS) - 1))
    def pin_unpin(self, k):
        if self.cache.pin(KEYS[k]):
            assert self.cache.unpin(KEYS[k])

    @rule(k=st.integers(0, len(KEYS) - 1))
    def hold(self, k):
        # a pinned entry only ever moves up, so one held above the last tier never blocks the last tier
        if self.cache.where(KEYS[k]) not in (None, "disk") and self.cache.pin(KEYS[k]):
            self.held.append(KEYS[k])

    @rule(tier=st.sampled_from(["device", "host"]))
    def hold_tier(self, tier):
        # a long prompt being read pins many entries at once: a tier full of them cannot make room
        for k in KEYS:
            if self.cache.where(k) == tier and self.cache.pin(k):
                self.held.append(k)

    # No preconditions on the cache's state: after the concurrent rule, which puts won is up to the threads,
    # and a rule's availability must not depend on it (hypothesis replays the same draws).
    @rule(everything=st.booleans())
    def release(self, everything):
        for _ in range(min(len(self.held), len(self.held) if everything else 1)):
            self.cache.unpin(self.held.pop())  # False if removed meanwhile (remove ignores pins)

    @rule()
    def relieve_host(self):
        self.cache.relieve("host", 4 * 1024)

    @invariant()
    def budgets_hold(self):
        for t in self.cache.tiers:
            assert 0 <= t.used_bytes <= t.capacity_bytes, (t.name, t.used_bytes, t.capacity_bytes)

    @invariant()
    def nothing_dropped_above_the_last_tier(self):
        # a victim whose next tier cannot make room (full of held entries) goes further down, never out
        assert [t["evictions"] for t in self.cache.stats()["tiers"][:-1]] == [0, 0]

    @invariant()
    def index_matches_tiers(self):
        for k in KEYS:
            where = self.cache.where(k)
            for t in self.cache.tiers:
                assert t.contains(k) == (t.name == where)
            if where is not None:
                assert k in self.model

    @invariant()
    def every_indexed_entry_serves_its_value(self):
        # a cache that served nothing would pass "None or exact"; what the index holds must come back exact
        for k in KEYS:
            if self.cache.where(k) is not None:
                got = self.cache.get(k, promote=False)
                assert got is not None and torch.equal(got, self.model[k])


CacheMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestTieredCacheProperties = CacheMachine.TestCase
