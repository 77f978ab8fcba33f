"""Property test: the tiered cache against a reference dict, under any sequence of operations.

Invariants: ``get`` returns None or exactly what was last put under that key (never another key's data,
never a torn copy); no tier ever holds more bytes than its budget; the index agrees with the tiers; nothing
is dropped above the last tier while the last tier can make room (entries held pinned across steps, as a
prompt being read, never sit in the last tier here, so it always can). One rule runs a batched store and
reads plus a put from two threads at once (demotions into the disk tier are written outside the cache's
lock): a read then returns None, the old value or the new one, and the invariants hold after both finish.

``BatchedConcurrentMachine``: a host tier over a disk tier roomy enough that nothing ever has to leave the
cache, driven through the batched calls (``put_many`` of chained items, ``get_many``) and a rule that runs a
batch of stores and a batch of loads from two threads at once while demotions into disk are written. With
nothing to drop, the model is exact: every key it holds reads back bit-exact, a put that returns False (its key
pinned, or being read by the other thread) leaves the earlier value, and an entry is in exactly one tier.

``ThreeTierConcurrentMachine``: the same over device, host and disk tiers, so device victims are staged and
written into the host outside the lock too, cascading into disk.

The tests at the end script three TieredCache bugs these machines found (a failed disk replace lost the
earlier value; a put refused for room dropped what it had evicted while trying; a read between a put's tiers
missed a stored key and dropped it), each fixed since.
"""

import errno
import shutil
import tempfile
import threading
from unittest import mock

import pytest
import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.keys import Namespace, prefix_key
from qwen3vl_ray.tiers import disk as disk_tier
from qwen3vl_ray.tiers.config import TierConfig
from qwen3vl_ray.tiers.factory import make_tier
from tests.helpers_threads import run_together

NS = Namespace(model="prop")
KEYS = [prefix_key(NS, None, [i]) for i in range(12)]


def assert_blocks_account(cache: TieredCache, keys) -> None:
    """Each addressed (pooled) tier's blocks in use are exactly those of the entries' locations held in the
    store's records, each block in one location: no leaked block, no block of two entries (between steps no
    room is held for a write)."""
    for tier in cache.tiers:
        if not tier.addressed:
            continue
        owned = [b for k in keys for start, count in tier.block_runs(k) for b in range(start, start + count)]
        assert len(owned) == len(set(owned)), f"{tier.name}: a block belongs to two entries"
        assert len(owned) == tier.pool.in_use, f"{tier.name}: {tier.pool.in_use - len(owned)} blocks leaked"
        assert len(tier) == sum(1 for k in keys if tier.contains(k))


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

        run_together(store, read_and_put)
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
    def blocks_account(self):
        assert_blocks_account(self.cache, KEYS)

    @invariant()
    def every_indexed_entry_serves_its_value(self):
        # a cache that served nothing would pass "None or exact"; what the index holds must come back exact
        for k in KEYS:
            if self.cache.where(k) is not None:
                got = self.cache.get(k, promote=False)
                assert got is not None and torch.equal(got, self.model[k])


CacheMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestTieredCacheProperties = CacheMachine.TestCase


HOST_BYTES = 4 * 1024  # one large entry: most stores go straight to disk or demote the host's entry into it
# every key at its largest (700 float32 + the file header) twice over (a replace on disk holds the new file's
# room before the old file goes): the disk tier never has to drop anything, so the model below can be exact
DISK_BYTES = 2 * len(KEYS) * (700 * 4 + 256)
sizes = st.integers(1, 700)


class BatchedConcurrentMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.cache = TieredCache(CacheConfig(
            tiers=[TierConfig("host", HOST_BYTES, block_bytes=256), TierConfig("disk", DISK_BYTES, path=self.dir)],
            namespace=NS,
            prefetch_threads=0,
        ))
        self.model: dict[bytes, torch.Tensor] = {}
        self.version = 0
        self.held: list[bytes] = []

    def teardown(self):
        for k in self.held:
            self.cache.unpin(k)
        self.cache.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _chain(self, first: int, lengths: list[int]) -> list[tuple]:
        """A prompt's chunks as put_many items: distinct keys, each one's parent the chunk before it."""
        self.version += 1
        ks = [KEYS[(first + j) % len(KEYS)] for j in range(len(lengths))]
        return [(k, torch.arange(n, dtype=torch.float32) * 0.25 + self.version * 1000 + j, ks[j - 1] if j else None)
                for j, (k, n) in enumerate(zip(ks, lengths))]

    def _record(self, items: list[tuple], stored: list[bool]) -> None:
        # in order: a batch with a key twice is a sequence of puts, the later one winning
        for (k, t, *_), ok in zip(items, stored):
            if ok:
                self.model[k] = t
            # a False put keeps the earlier value (or none): the model keeps what it had

    @rule(first=st.integers(0, len(KEYS) - 1), lengths=st.lists(sizes, min_size=1, max_size=len(KEYS)))
    def put_chain(self, first, lengths):
        items = self._chain(first, lengths)
        self._record(items, self.cache.put_many(items))

    @rule(picks=st.lists(st.tuples(st.integers(0, len(KEYS) - 1), sizes), min_size=1, max_size=6))
    def put_any(self, picks):
        # keys in any order, repeats allowed, no parents: items given as (key, tensor)
        self.version += 1
        items = [(KEYS[k], torch.full((n,), float(self.version * 100 + j))) for j, (k, n) in enumerate(picks)]
        self._record(items, self.cache.put_many(items))

    @rule(ks=st.lists(st.integers(0, len(KEYS) - 1), min_size=1, max_size=8), promote=st.booleans())
    def get_batch(self, ks, promote):
        for k, got in zip(ks, self.cache.get_many([KEYS[k] for k in ks], promote=promote)):
            want = self.model.get(KEYS[k])
            assert (got is None) == (want is None), f"key {k}: got {got is not None}, stored {want is not None}"
            if want is not None:
                assert torch.equal(got, want), f"key {k} read back other bytes"

    @rule(first=st.integers(0, len(KEYS) - 1), lengths=st.lists(sizes, min_size=1, max_size=8),
          reads=st.lists(st.integers(0, len(KEYS) - 1), min_size=1, max_size=8), promote=st.booleans())
    def concurrent_stores_and_loads(self, first, lengths, reads, promote):
        # thread A stores a chained batch while thread B loads a batch (promoting: host victims demote into disk)
        items = self._chain(first, lengths)
        before = dict(self.model)
        new = {k: t for k, t, _ in items}
        read_keys = [KEYS[k] for k in reads]
        start = threading.Barrier(2)
        out: dict = {}

        def store():
            start.wait()
            out["stored"] = self.cache.put_many(items)

        def load():
            start.wait()
            out["loaded"] = self.cache.get_many(read_keys, promote=promote)

        demoted = self.cache.stats()["tiers"][-1]["demotions_in"]
        run_together(store, load)
        event(f"concurrent: demoted into disk meanwhile: {self.cache.stats()['tiers'][-1]['demotions_in'] > demoted}")
        assert "stored" in out and "loaded" in out, "a thread raised (its traceback is above)"
        for k, got in zip(read_keys, out["loaded"]):
            # A key stored before stays indexed throughout (a replace swaps it under the lock): it never misses,
            # whether or not the other thread is storing it (test_a_read_between_a_puts_tiers_misses_a_stored_key)
            if k in before:
                assert got is not None, (
                    f"a stored key missed while another thread stored and demoted (where now: "
                    f"{self.cache.where(k)}, dropped: {self.cache.stats()['dropped']}, held: {k in self.held})")
            allowed = [v for v in (before.get(k), new.get(k)) if v is not None]
            if got is not None:
                assert any(torch.equal(got, v) for v in allowed), "a read saw bytes never put under its key"
        self._record(items, out["stored"])
        event(f"concurrent: a store refused: {not all(out['stored'])}")

    @rule(k=st.integers(0, len(KEYS) - 1))
    def hold(self, k):
        # a pinned key cannot be replaced: puts of it return False and must leave the pinned value in place
        if self.cache.pin(KEYS[k]):
            self.held.append(KEYS[k])

    @rule()
    def release(self):
        if self.held:
            assert self.cache.unpin(self.held.pop())

    @rule(k=st.integers(0, len(KEYS) - 1))
    def remove(self, k):
        if KEYS[k] not in self.held and self.cache.remove(KEYS[k]):
            self.model.pop(KEYS[k])

    @invariant()
    def budgets_hold(self):
        for t in self.cache.stats()["tiers"]:
            assert 0 <= t["used_bytes"] <= t["capacity_bytes"], (t["name"], t["used_bytes"], t["capacity_bytes"])

    @invariant()
    def nothing_dropped(self):
        assert self.cache.stats()["dropped"] == 0

    @invariant()
    def each_entry_in_exactly_one_tier(self):
        for k in KEYS:
            holders = [t.name for t in self.cache.tiers if t.contains(k)]
            where = self.cache.where(k)
            assert holders == ([where] if where is not None else []), (holders, where)
            assert (where is not None) == (k in self.model), (where, k in self.model)

    @invariant()
    def blocks_account(self):
        assert_blocks_account(self.cache, KEYS)

    @invariant()
    def every_stored_key_reads_back_exactly(self):
        for k, want in self.model.items():
            got = self.cache.get(k, promote=False)
            assert got is not None and torch.equal(got, want)


BatchedConcurrentMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
TestTieredCacheBatchedConcurrent = BatchedConcurrentMachine.TestCase


class BatchedConcurrentObjectStoreMachine(BatchedConcurrentMachine):
    """The same machine over a node agent's tiers: the host tier is the Ray object-store tier (driven through
    ``LocalObjectStore``, the store's semantics without Ray), which holds room and puts each written batch as
    one slab; its budget counts whole live slabs."""

    def __init__(self):
        super().__init__()
        self.cache.close()
        from actors.object_store_tier import LocalObjectStore, ObjectStoreTier

        cfg = CacheConfig(tiers=[TierConfig("host", HOST_BYTES), TierConfig("disk", DISK_BYTES, path=self.dir)],
                          namespace=NS, prefetch_threads=0)
        self.cache = TieredCache(cfg, tiers=[ObjectStoreTier(HOST_BYTES, store=LocalObjectStore(), slab_bytes=2048),
                                             make_tier(cfg.tiers[1], NS)])


BatchedConcurrentObjectStoreMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
TestObjectStoreTierBatchedConcurrent = BatchedConcurrentObjectStoreMachine.TestCase


class ThreeTierConcurrentMachine(BatchedConcurrentMachine):
    """The same machine over device, host and disk tiers. A device victim is staged under the lock and encoded,
    given room in the host and written there outside it (write rounds); making room in the host demotes the
    host's victims into disk in the next round, and a victim the host cannot take (every entry there pinned)
    goes on to disk. The exact model holds: the disk tier still never has to drop anything."""

    def __init__(self):
        super().__init__()
        self.cache.close()
        self.cache = TieredCache(CacheConfig(
            tiers=[TierConfig("device", HOST_BYTES, device="cpu", block_bytes=256),
                   TierConfig("host", HOST_BYTES, block_bytes=256), TierConfig("disk", DISK_BYTES, path=self.dir)],
            namespace=NS,
            prefetch_threads=0,
        ))

    @invariant()
    def in_memory_demotions_seen(self):
        event(f"three tiers: demoted into host so far: {self.cache.stats()['tiers'][1]['demotions_in'] > 0}")


ThreeTierConcurrentMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
TestThreeTierBatchedConcurrent = ThreeTierConcurrentMachine.TestCase


def test_a_put_whose_disk_write_fails_keeps_the_earlier_value(tmp_path):
    # the invariant the machines cannot reach without fault injection: nothing already stored is lost by a
    # failed put. The index takes the new entry before its file is written; when the write fails (ENOSPC
    # here) the old entry, whose file the tier never touched (it writes aside and renames), is indexed again
    cache = TieredCache(CacheConfig(tiers=[TierConfig("disk", 64 * 1024, path=str(tmp_path))], namespace=NS,
                                    prefetch_threads=0))
    old = torch.arange(100, dtype=torch.float32)
    assert cache.put(KEYS[0], old)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with mock.patch.object(disk_tier, "_write_and_hash", no_space):
        assert cache.put(KEYS[0], torch.zeros(100)) is False
    got = cache.get(KEYS[0])
    cache.close()
    assert got is not None and torch.equal(got, old)


@pytest.mark.parametrize("kind", ["disk", "host"])
def test_a_put_refused_for_room_drops_nothing(tmp_path, kind):
    # a 10 KiB tier holds a (pinned: being read) and b, 4 KiB each; c needs 7 KiB, which only a's room could
    # give: the put is refused, and b must not have been evicted for it either
    tier = TierConfig(kind, 10 * 1024, path=str(tmp_path)) if kind == "disk" else TierConfig(kind, 10 * 1024,
                                                                                          block_bytes=256)
    cache = TieredCache(CacheConfig(tiers=[tier], namespace=NS, prefetch_threads=0))
    assert cache.put(KEYS[0], torch.zeros(1000)) and cache.put(KEYS[1], torch.ones(1000))
    assert cache.pin(KEYS[0])
    assert cache.put(KEYS[2], torch.ones(1750)) is False
    where, dropped = cache.where(KEYS[1]), cache.stats()["dropped"]
    cache.close()
    assert (where, dropped) == (kind, 0)


def test_a_read_between_a_puts_tiers_misses_a_stored_key(tmp_path):
    # Found by BatchedConcurrentMachine (a few runs in a thousand). Scripted here with two threads paused in
    # the disk tier's prepare_store, the one step each takes outside the cache's lock:
    #   B promotes k; the host makes room by staging v's demotion into disk (queued, bytes read out)
    #   A's put_many of v: the host cannot take v (larger than the host tier), and A encodes v for disk with the
    #   lock released
    #   a read of v meanwhile must get its old value: the queued demotion may only be called off where the new
    #   value is placed (the host tier used to call it off first, leaving v indexed on disk with no bytes)
    cache = TieredCache(CacheConfig(tiers=[TierConfig("host", 4096, block_bytes=256),
                                           TierConfig("disk", 64 * 1024, path=str(tmp_path))],
                                    namespace=NS, prefetch_threads=0))
    k, v = KEYS[0], KEYS[1]
    old_v = torch.arange(768, dtype=torch.float32)  # 3 KiB
    assert cache.put(k, torch.ones(512)) and cache.put(v, old_v)  # v's put demotes k into disk
    assert (cache.where(k), cache.where(v)) == ("disk", "host")
    prepare = cache.tiers[1].prepare_store
    b_queued, b_go, a_between, a_go = (threading.Event() for _ in range(4))

    def paused_prepare(key, tensor):
        if key == v and threading.current_thread().name == "B":
            b_queued.set()
            b_go.wait(10)
        if key == v and threading.current_thread().name == "A":
            a_between.set()
            a_go.wait(10)
        return prepare(key, tensor)

    cache.tiers[1].prepare_store = paused_prepare
    b = threading.Thread(name="B", target=cache.get, args=(k,), kwargs={"promote": True})
    a = threading.Thread(name="A", target=cache.put_many, args=([(v, torch.zeros(1280))],))  # 5 KiB: disk only
    try:
        b.start()
        assert b_queued.wait(10)
        a.start()
        assert a_between.wait(10)
        got = cache.get(v, promote=False)
    finally:
        a_go.set()
        b_go.set()
        a.join(10)
        b.join(10)
        cache.close()
    assert got is not None and torch.equal(got, old_v)


def test_a_put_whose_write_fails_in_a_lower_tier_keeps_the_value_held_above(tmp_path):
    # the new value is too big for the host tier and goes to disk; the old one stays in host (tiers keep it
    # until the new value commits) and, the disk write failing, is the key's value again
    cache = TieredCache(CacheConfig(tiers=[TierConfig("host", 4096, block_bytes=256),
                                           TierConfig("disk", 64 * 1024, path=str(tmp_path))],
                                    namespace=NS, prefetch_threads=0))
    old = torch.arange(256, dtype=torch.float32)  # 1 KiB: host
    assert cache.put(KEYS[0], old) and cache.where(KEYS[0]) == "host"
    with mock.patch.object(disk_tier, "_write_and_hash", mock.Mock(side_effect=OSError(errno.ENOSPC, "full"))):
        assert cache.put(KEYS[0], torch.zeros(2048)) is False  # 8 KiB: only the disk tier can take it
    where, got = cache.where(KEYS[0]), cache.get(KEYS[0], promote=False)
    assert cache.put(KEYS[0], torch.ones(2048))  # and a later put that lands replaces it for good
    stats, new_where = cache.stats(), cache.where(KEYS[0])
    cache.close()
    assert where == "host" and torch.equal(got, old)
    assert new_where == "disk" and [t["entries"] for t in stats["tiers"]] == [0, 1]
    assert stats["tiers"][0]["used_bytes"] == 0


def test_a_put_superseding_a_queued_put_keeps_what_that_one_would_have_fallen_back_to(tmp_path, monkeypatch):
    # P1's replace of v0 is indexed and queued (its write not started) when P2's replace calls it off and then
    # fails: v0, whole on disk all along, is the key's value again (P1 never landed: it returns False too)
    cache = TieredCache(CacheConfig(tiers=[TierConfig("disk", 64 * 1024, path=str(tmp_path))], namespace=NS,
                                    prefetch_threads=0))
    v0 = torch.arange(256, dtype=torch.float32)
    assert cache.put(KEYS[0], v0)
    gate, queued = threading.Event(), threading.Event()
    finish = cache._finish_writes

    def held_finish(writes):
        if threading.current_thread().name == "P1":
            queued.set()
            assert gate.wait(10)
        return finish(writes)

    monkeypatch.setattr(cache, "_finish_writes", held_finish)
    out = {}
    p1 = threading.Thread(name="P1", target=lambda: out.setdefault("p1", cache.put(KEYS[0], torch.ones(256))))
    p1.start()
    try:
        assert queued.wait(10)
        with mock.patch.object(disk_tier, "_write_and_hash", mock.Mock(side_effect=OSError(errno.ENOSPC, "full"))):
            out["p2"] = cache.put(KEYS[0], torch.zeros(256))
    finally:
        gate.set()
        p1.join(10)
    got = cache.get(KEYS[0])
    cache.close()
    assert out == {"p1": False, "p2": False} and got is not None and torch.equal(got, v0)
