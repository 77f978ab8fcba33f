"""In-memory demotions and promotions move their bytes outside the store's metadata lock (issue 10).

A device victim is staged like a disk-bound one: under the lock it is indexed in the host tier, in flight,
its bytes still in its device blocks; the write rounds read them out, give the device room back, encode them
for the host, hold room there and copy them into the host's blocks, each byte move outside the lock. Making
room in the host demotes the host's own victims in the next round, and a victim the host cannot take (every
host entry pinned, or the host's codec refuses the tensor) goes on to the disk tier instead of being dropped. A promotion is staged the same way:
room is made and held in the device tier under the lock, the copy runs in the rounds, and the entry's bytes stay
in the host until that copy commits (a failed copy leaves it there).

Each test that holds a step does so on an event in the demoting thread, and every call made meanwhile is
bounded by a generous timeout: a call that waited on the held step would time out, not hang the test.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.tiers.config import TierConfig
from tests.test_store_disk_io import ELEMS, NS, WAIT, key, value  # 4 KiB float32 entries, a generous timeout
from tests.test_tiered_cache_property import assert_blocks_account


def make_cache(tmp_path, device_entries=2, host_entries=3, host_codec="none", policy="lru") -> TieredCache:
    tiers = [TierConfig("device", device_entries * ELEMS * 4, device="cpu", block_bytes=512),
             TierConfig("host", host_entries * ELEMS * 4, codec=host_codec, block_bytes=512),
             TierConfig("disk", 32 * (ELEMS * 4 + 512), path=str(tmp_path / "disk"))]
    return TieredCache(CacheConfig(tiers=tiers, policy=policy, namespace=NS, prefetch_threads=0))


class Held:
    """Holds the first call of one of a tier's methods in the thread that makes it, until ``release``."""

    def __init__(self, monkeypatch, tier, method: str) -> None:
        self.entered, self.released = threading.Event(), threading.Event()
        self._first = threading.Lock()
        real = getattr(tier, method)

        def held(*args, **kwargs):
            if self._first.acquire(blocking=False):
                self.entered.set()
                assert self.released.wait(WAIT), "the held step was never released"
            return real(*args, **kwargs)

        monkeypatch.setattr(tier, method, held)


@pytest.mark.parametrize("step", ["prepare_store", "write"])
def test_the_store_serves_others_while_a_device_victim_is_encoded_or_copied_into_host(tmp_path, monkeypatch, step):
    # step: the host tier's encode of the victim, or the copy of its bytes into the host's blocks
    with make_cache(tmp_path) as c, ThreadPoolExecutor(1) as demoter, ThreadPoolExecutor(1) as other:
        for i in range(2):
            assert c.put(key(i), value(i))
        assert [c.where(key(i)) for i in range(2)] == ["device", "device"]
        held = Held(monkeypatch, c.tiers[1], step)
        demotion = demoter.submit(c.demote, key(0))
        assert held.entered.wait(WAIT)
        try:
            def meanwhile():
                return {
                    "where": c.where(key(0)),  # indexed in the host already; its device room is free
                    "in_flight_read": c.get(key(0), promote=False),  # served from the bytes being written
                    "device_read": c.get(key(1)),
                    "contains": c.contains_many([key(0), key(1), key(2)]),
                    "put": c.put(key(2), value(2)),  # into the device room entry 0 left
                    "stats": c.stats()["entries"],
                }

            seen = other.submit(meanwhile).result(timeout=WAIT)
            assert not demotion.done()  # the held step is still held: nothing above waited for it
        finally:
            held.released.set()
        assert demotion.result(timeout=WAIT) is True
        assert seen["where"] == "host"
        assert torch.equal(seen["in_flight_read"], value(0))
        assert torch.equal(seen["device_read"], value(1))
        assert seen["contains"] == [True, True, False]
        assert seen["put"] is True and seen["stats"] == 3
        assert [c.where(key(i)) for i in range(3)] == ["host", "device", "device"]
        for i in range(3):
            assert torch.equal(c.get(key(i), promote=False), value(i))
        assert c.stats()["tiers"][1]["demotions_in"] == 1 and c.stats()["dropped"] == 0
        assert_blocks_account(c, [key(i) for i in range(3)])


def test_the_store_serves_others_while_a_device_victim_is_read_out(tmp_path, monkeypatch):
    # the victim's bytes stay in its device blocks until the write rounds read them out, outside the lock
    with make_cache(tmp_path) as c, ThreadPoolExecutor(1) as demoter, ThreadPoolExecutor(1) as other:
        for i in range(2):
            assert c.put(key(i), value(i))
        held = Held(monkeypatch, c.tiers[0], "read")  # the first read of the device tier: the victim's
        demotion = demoter.submit(c.demote, key(0))
        assert held.entered.wait(WAIT)
        try:
            def meanwhile():
                return {
                    "where": c.where(key(0)),
                    "victim_read": c.get(key(0), promote=False),  # from the device blocks it is leaving
                    "device_read": c.get(key(1)),
                    "put": c.put(key(2), value(2)),  # the device room entry 0 leaves is not free yet: 1 goes down
                    "stats": c.stats()["entries"],
                }

            seen = other.submit(meanwhile).result(timeout=WAIT)
            assert not demotion.done()
        finally:
            held.released.set()
        assert demotion.result(timeout=WAIT) is True
        assert seen["where"] == "host" and seen["put"] is True and seen["stats"] == 3
        assert torch.equal(seen["victim_read"], value(0)) and torch.equal(seen["device_read"], value(1))
        assert [c.where(key(i)) for i in range(3)] == ["host", "host", "device"]
        for i in range(3):
            assert torch.equal(c.get(key(i), promote=False), value(i))
        assert c.stats()["dropped"] == 0
        assert_blocks_account(c, [key(i) for i in range(3)])


def test_making_room_in_host_for_a_device_victim_demotes_the_hosts_victim_into_disk(tmp_path):
    with make_cache(tmp_path, device_entries=1, host_entries=1) as c:
        for i in range(3):  # 0 and 1 go down a tier each as the next one arrives
            assert c.put(key(i), value(i))
        assert [c.where(key(i)) for i in range(3)] == ["disk", "host", "device"]
        stats = c.stats()
        assert [t["demotions_in"] for t in stats["tiers"]] == [0, 2, 1] and stats["dropped"] == 0
        for i in range(3):
            assert torch.equal(c.get(key(i), promote=False), value(i))
        assert_blocks_account(c, [key(i) for i in range(3)])


def test_a_device_victim_the_pinned_host_cannot_take_goes_on_to_disk(tmp_path):
    with make_cache(tmp_path, device_entries=1, host_entries=1) as c:
        assert c.put(key(0), value(0)) and c.put(key(1), value(1))
        assert c.where(key(0)) == "host"
        assert c.pin(key(0))  # the host's only entry: no room can be made there
        assert c.put(key(2), value(2))  # demotes 1 from the device: the host cannot take it
        assert [c.where(key(i)) for i in range(3)] == ["host", "disk", "device"]
        assert c.stats()["dropped"] == 0
        for i in range(3):
            assert torch.equal(c.get(key(i), promote=False), value(i))
        assert_blocks_account(c, [key(i) for i in range(3)])


def test_a_device_victim_the_hosts_codec_refuses_goes_on_to_disk(tmp_path):
    # int8 refuses a tensor with NaN; the disk tier stores it raw
    with make_cache(tmp_path, device_entries=1, host_codec="int8") as c:
        poisoned = value(0).clone()
        poisoned[7] = float("nan")
        assert c.put(key(0), poisoned)
        assert c.where(key(0)) == "device"
        assert c.put(key(1), value(1))
        assert [c.where(key(0)), c.where(key(1))] == ["disk", "device"]
        assert c.stats()["dropped"] == 0
        # NaN != NaN: compared bit for bit
        assert torch.equal(c.get(key(0), promote=False).view(torch.int32), poisoned.view(torch.int32))


def test_the_store_serves_others_while_a_promotion_is_copied_into_the_device_tier(tmp_path, monkeypatch):
    with make_cache(tmp_path) as c, ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as other:
        for i in range(3):  # 0 goes down to the host as 2 arrives
            assert c.put(key(i), value(i))
        assert [c.where(key(i)) for i in range(3)] == ["host", "device", "device"]
        held = Held(monkeypatch, c.tiers[0], "write")
        promotion = reader.submit(c.lookup, key(0))  # a host hit: promoted, pushing 1 down to the host
        assert held.entered.wait(WAIT)
        try:
            def meanwhile():
                return {
                    "where": [c.where(key(i)) for i in range(3)],
                    "in_flight_read": c.get(key(0), promote=False),  # served from the bytes being written
                    "device_read": c.get(key(2)),
                    "host_read": c.get(key(1), promote=False),
                    "put": c.put(key(3), value(3), parent=key(2)),
                }

            seen = other.submit(meanwhile).result(timeout=WAIT)
            assert not promotion.done()
        finally:
            held.released.set()
        got, tier = promotion.result(timeout=WAIT)
        assert tier == "host" and torch.equal(got, value(0))
        assert seen["where"] == ["device", "host", "device"]
        assert torch.equal(seen["in_flight_read"], value(0))
        assert torch.equal(seen["device_read"], value(2)) and torch.equal(seen["host_read"], value(1))
        assert seen["put"] is True
        assert c.stats()["tiers"][0]["promotions_in"] == 1 and c.stats()["dropped"] == 0
        for i in range(4):
            assert torch.equal(c.get(key(i), promote=False), value(i))
        assert_blocks_account(c, [key(i) for i in range(4)])


def test_a_promotion_whose_copy_fails_leaves_the_entry_where_it_was(tmp_path, monkeypatch):
    with make_cache(tmp_path) as c:
        for i in range(3):
            assert c.put(key(i), value(i))
        assert c.where(key(0)) == "host"
        device = c.tiers[0]

        def failing_write(res):  # an I/O failure: the room goes back, nothing stored (``Tier.write``)
            device.abort(res)
            return False

        monkeypatch.setattr(device, "write", failing_write)
        got, tier = c.lookup(key(0))
        assert tier == "host" and torch.equal(got, value(0))  # the reader has its bytes all the same
        assert c.where(key(0)) == "host" and c.stats()["tiers"][0]["promotions_in"] == 0
        monkeypatch.undo()
        for i in range(3):
            assert torch.equal(c.get(key(i), promote=False), value(i))
        assert c.stats()["dropped"] == 0
        assert_blocks_account(c, [key(i) for i in range(3)])
        assert c.lookup(key(0))[1] == "host" and c.where(key(0)) == "device"  # the next hit promotes it


def test_no_entry_bytes_are_read_encoded_or_written_under_the_managers_lock(tmp_path):
    # A workload through all three tiers: puts that demote device -> host (int8) -> disk, hits that promote,
    # a relieve and a demote. Every read, encode and write of an entry's bytes is the facade's or the movers',
    # outside the manager's lock (its deliberate exceptions, a replace in place and a tier without held room,
    # do not occur here).
    with make_cache(tmp_path, device_entries=2, host_entries=3, host_codec="int8") as c:
        lock = c.manager._lock
        calls = []
        for tier in c.tiers:
            for name in ("read", "get", "prepare_store", "write"):
                def wrapped(*args, _real=getattr(tier, name), _call=(tier.name, name), **kwargs):
                    calls.append((*_call, lock._is_owned()))
                    return _real(*args, **kwargs)

                setattr(tier, name, wrapped)
        for i in range(10):
            assert c.put(key(i), value(i))
        for i in range(10):
            got = c.get(key(i))
            assert got is not None and torch.nn.functional.cosine_similarity(got, value(i), dim=0) > 0.999
        c.relieve("device", 0)
        assert c.demote(key(9))
        assert [call for call in calls if call[2]] == []
        exercised = {call[:2] for call in calls}
        for step in [("device", "prepare_store"), ("device", "write"), ("device", "read"), ("host", "prepare_store"),
                     ("host", "write"), ("host", "read"), ("disk", "prepare_store"), ("disk", "write"),
                     ("disk", "get")]:
            assert step in exercised, step
        assert c.stats()["dropped"] == 0


def test_a_put_waits_for_a_reader_still_copying_its_victims_old_room(tmp_path, monkeypatch):
    # Found by review: the movers were done with the victim, but a reader still copied its bytes out of the old
    # device blocks, so the put that needed them found no room and returned False although every tier had room
    with make_cache(tmp_path, device_entries=1) as c, ThreadPoolExecutor(1) as putter, \
            ThreadPoolExecutor(1) as reader:
        assert c.put(key(0), value(0))
        device, real = c.tiers[0], c.tiers[0].read
        in_put, in_get, go_put, go_get = (threading.Event() for _ in range(4))

        def read(place, out=None):  # holds the movers' read of the victim, then a reader's
            if threading.current_thread().name.startswith("put"):
                in_put.set()
                assert go_put.wait(WAIT)
            elif threading.current_thread().name.startswith("get"):
                in_get.set()
                assert go_get.wait(WAIT)
            return real(place, out)

        monkeypatch.setattr(device, "read", read)
        putter._thread_name_prefix, reader._thread_name_prefix = "put", "get"
        put = putter.submit(c.put, key(1), value(1))  # demotes 0: its bytes are read out of the device
        assert in_put.wait(WAIT)
        got = reader.submit(c.get, key(0), False)  # reads 0 where its bytes still are
        assert in_get.wait(WAIT)
        go_put.set()
        threading.Timer(0.2, go_get.set).start()  # the reader finishes while the put waits for the room
        assert put.result(timeout=WAIT) is True
        assert torch.equal(got.result(timeout=WAIT), value(0))
        monkeypatch.undo()
        assert [c.where(key(0)), c.where(key(1))] == ["host", "device"]
        assert c.stats()["dropped"] == 0
        assert_blocks_account(c, [key(0), key(1)])


def test_a_promotion_whose_encode_raises_fails_the_read_and_strands_nothing(tmp_path, monkeypatch):
    # Found by review: an exception other than a codec's refusal from the promotion's encode left the entry in
    # flight for good (never removable, demotable or evictable again)
    with make_cache(tmp_path) as c:
        for i in range(3):
            assert c.put(key(i), value(i))
        assert c.where(key(0)) == "host"

        def out_of_memory(*args, **kwargs):
            raise RuntimeError("device out of memory")

        monkeypatch.setattr(c.tiers[0], "prepare_store", out_of_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            c.get(key(0))
        monkeypatch.undo()
        assert c.where(key(0)) == "host" and torch.equal(c.get(key(0), promote=False), value(0))
        assert c.demote(key(0)) and c.where(key(0)) == "disk"
        assert c.remove(key(0)) and c.where(key(0)) is None
        assert_blocks_account(c, [key(i) for i in range(3)])
