"""No metadata operation waits on disk I/O (issue 10): a disk write held mid-way never blocks lookups, reads
or host puts, and a write that fails loses only its own entry, never serves wrong bytes.

The disk tier's payload write (``tiers.disk._write_and_hash``) is held on an event: the thread that demoted
an entry sits in it while other threads use the cache, each call bounded by a generous timeout (a call that
waited on the held write would time out, not hang the test).
"""

import errno
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.keys import Namespace, prefix_key
from qwen3vl_ray.tiers import disk as disk_mod
from qwen3vl_ray.tiers.config import TierConfig

NS = Namespace(model="store-disk-io")
ELEMS = 1024  # float32 -> 4 KiB per entry
WAIT = 30  # seconds; only a call stuck behind the held write gets anywhere near it


def key(i: int):
    return prefix_key(NS, None, [i])


def value(i: int) -> torch.Tensor:
    return torch.arange(ELEMS, dtype=torch.float32) * 0.25 + i


def make_cache(tmp_path, host_entries=4, disk_entries=16) -> TieredCache:
    tiers = [TierConfig("host", host_entries * ELEMS * 4, block_bytes=512),
             TierConfig("disk", disk_entries * (ELEMS * 4 + 512), path=str(tmp_path / "disk"))]  # fsync on
    return TieredCache(CacheConfig(tiers=tiers, policy="lru", namespace=NS, prefetch_threads=0))


class HeldWrites:
    """Holds the first disk payload write until ``release``; later writes pass."""

    def __init__(self, monkeypatch) -> None:
        self.entered, self.released = threading.Event(), threading.Event()
        self._first = threading.Lock()
        real = disk_mod._write_and_hash

        def held(fd, view, offset):
            if self._first.acquire(blocking=False):  # the first write only
                self.entered.set()
                assert self.released.wait(WAIT), "the held write was never released"
            return real(fd, view, offset)

        monkeypatch.setattr(disk_mod, "_write_and_hash", held)


def test_lookups_reads_and_host_puts_complete_while_a_disk_write_is_held(tmp_path, monkeypatch):
    held = HeldWrites(monkeypatch)
    with make_cache(tmp_path) as c, ThreadPoolExecutor(1) as demoter, ThreadPoolExecutor(1) as other:
        for i in range(3):
            assert c.put(key(i), value(i))
        # demote entry 0 into the disk tier: its file write is held mid-way
        demotion = demoter.submit(c.demote, key(0))
        assert held.entered.wait(WAIT)
        try:
            def meanwhile():
                seen = {
                    "contains": c.contains(key(1)),
                    "prefix": c.longest_prefix([key(1), key(2)]),
                    "where": c.where(key(0)),  # already the disk tier's: the host slot is free
                    "host_read": c.get(key(1)),
                    "in_flight_read": c.get(key(0)),  # served from the bytes being written
                    "put": c.put(key(3), value(3)),  # a host put into the room entry 0 left
                    # a host put that demotes another entry: its own disk write is not held
                    "put_demoting": [c.put(key(i), value(i)) for i in (4, 5)],
                    "stats": c.stats()["entries"],
                }
                return seen

            seen = other.submit(meanwhile).result(timeout=WAIT)
            assert not demotion.done()  # the held write is still held: nothing above waited for it
        finally:
            held.released.set()
        assert demotion.result(timeout=WAIT) is True
    # (the cache is closed here; check what the calls saw and what landed on disk)
    assert seen["contains"] and seen["prefix"] == 2 and seen["where"] == "disk"
    assert torch.equal(seen["host_read"], value(1)) and torch.equal(seen["in_flight_read"], value(0))
    assert seen["put"] and seen["put_demoting"] == [True, True] and seen["stats"] == 6
    with make_cache(tmp_path) as again:  # a new process finds the held write complete on disk, exact
        assert torch.equal(again.get(key(0), promote=False), value(0))


def test_the_held_entry_lands_on_disk_with_exact_bytes_and_one_record(tmp_path, monkeypatch):
    held = HeldWrites(monkeypatch)
    with make_cache(tmp_path) as c, ThreadPoolExecutor(1) as demoter:
        for i in range(4):
            assert c.put(key(i), value(i))
        demotion = demoter.submit(c.demote, key(0))
        assert held.entered.wait(WAIT)
        # while the write is held the entry is neither removable nor replaceable (it would tear), and its
        # disk room is already counted
        assert c.remove(key(0)) is False and c.put(key(0), value(9)) is False
        disk = c.tiers[1]
        assert disk.used_bytes > 0 and not disk.contains(key(0))
        held.released.set()
        assert demotion.result(timeout=WAIT)
        assert c.where(key(0)) == "disk" and disk.contains(key(0)) and not c.tiers[0].contains(key(0))
        assert torch.equal(disk.get(key(0)), value(0))
        assert disk.used_bytes == disk.entry_nbytes(key(0)) and disk.stats()["entries"] == 1
        s = c.stats()
        assert s["dropped"] == 0 and s["tiers"][1]["demotions_in"] == 1
        assert torch.equal(c.get(key(0)), value(0)) and c.where(key(0)) == "host"  # promoted back


def test_a_failed_disk_write_loses_only_its_entry_and_gives_its_room_back(tmp_path, monkeypatch):
    def no_space(fd, view, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    with make_cache(tmp_path) as c:
        for i in range(4):
            assert c.put(key(i), value(i))
        monkeypatch.setattr(disk_mod, "_write_and_hash", no_space)
        # a put into the full host tier demotes entry 0, whose write fails: 0 leaves the cache (counted),
        # the put itself succeeds, and the disk tier holds nothing and reserves nothing
        assert c.put(key(4), value(4))
        assert c.where(key(0)) is None and c.get(key(0)) is None
        disk = c.tiers[1]
        assert disk.used_bytes == 0 and len(disk) == 0
        s = c.stats()
        assert s["dropped"] == 1 and s["tiers"][1]["evictions"] == 1 and s["entries"] == 4
        # a put that goes straight to disk (host pinned full) and fails to write is a False put, not an entry
        with c.pinned([key(i) for i in range(1, 5)]):
            assert c.put(key(5), value(5)) is False
        assert c.where(key(5)) is None and disk.used_bytes == 0
        monkeypatch.undo()
        assert c.put(key(6), value(6)) and c.where(key(1)) == "disk"
        assert torch.equal(c.get(key(1), promote=False), value(1))


def test_concurrent_batches_and_reads_keep_budgets_and_exact_values(tmp_path):
    readers = 2
    # two writers store overlapping chains in batches through a small host tier (every batch demotes into
    # the disk tier, written outside the lock) while readers read everything: each read is None or exact,
    # and afterwards every tier is within budget and agrees with the index
    with make_cache(tmp_path, host_entries=4, disk_entries=64) as c:
        wrong: list = []
        stop = threading.Event()

        def writer(w):
            for r in range(6):
                items = [(key(16 * w + j), value(16 * w + j)) for j in range(8 * (r % 2), 8 * (r % 2) + 8)]
                c.put_many(items)

        def reader():
            while not stop.is_set():
                for i in range(32):
                    got = c.get(key(i), promote=bool(i % 2))
                    if got is not None and not torch.equal(got, value(i)):
                        wrong.append(i)

        with ThreadPoolExecutor(2 + readers) as pool:
            rs = [pool.submit(reader) for _ in range(readers)]
            for f in [pool.submit(writer, w) for w in range(2)]:
                f.result(timeout=120)
            stop.set()
            for f in rs:
                f.result(timeout=WAIT)
        assert wrong == []
        for t in c.tiers:
            assert 0 <= t.used_bytes <= t.capacity_bytes
            assert t.used_bytes == sum(t.entry_nbytes(k) for k in list(t.keys()))
        for i in range(32):
            holders = [t.name for t in c.tiers if t.contains(key(i))]
            assert holders == ([c.where(key(i))] if c.where(key(i)) else []), (i, holders)
        assert c.stats()["dropped"] == 0 and len(c) == 32
        for i in range(32):
            assert torch.equal(c.get(key(i), promote=False), value(i))
