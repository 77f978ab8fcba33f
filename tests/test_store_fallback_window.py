"""A put that replaces an entry from another tier keeps the old value where it is to fall back to until its own
write lands. Between the put's placement (under the store's lock) and its write (outside it) other calls run:
another put of the same key, a child of it, other traffic. The old value's record is then in its tier's policy but
not in the index; these tests run those calls at that moment (a hook at the entry of the put's write round, where
a second thread would get the lock) and check the policy still knows the entry as the index does."""

from __future__ import annotations

import errno

import pytest
import torch

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.keys import Namespace, prefix_key
from qwen3vl_ray.tiers import disk as disk_mod
from qwen3vl_ray.tiers.config import TierConfig

NS = Namespace(model="fallback-window")
E = 64  # float32 elements: 256 B, one host block


def k(i: int) -> bytes:
    return prefix_key(NS, None, [i])


def v(n: int, x: float) -> torch.Tensor:
    return torch.full((n,), float(x))


def store(tmp_path, host_blocks: int, policy: str = "prefix-lru") -> TieredCache:
    return TieredCache(CacheConfig(tiers=[TierConfig("host", host_blocks * E * 4, block_bytes=E * 4),
                                          TierConfig("disk", 512 * E * 4, path=str(tmp_path / "d"), fsync=False)],
                                   policy=policy, namespace=NS, prefetch_threads=0))


def at_write_round(c: TieredCache, meanwhile) -> None:
    """Run ``meanwhile()`` once, when the next put with writes reaches its write round (the lock is free)."""
    real = c._finish_writes

    def hooked(writes):
        if writes:
            c._finish_writes = real
            meanwhile()
        return real(writes)

    c._finish_writes = hooked


def failing_disk_writes(monkeypatch) -> None:
    def fail(fd, view, offset):
        raise OSError(errno.ENOSPC, "injected")

    monkeypatch.setattr(disk_mod, "_write_and_hash", fail)


def host_entries(c: TieredCache) -> int:
    return sum(1 for r in c.manager._index.values() if r.tier == 0)


@pytest.mark.parametrize("policy", ["prefix-lru", "lru"])
def test_a_put_over_a_called_off_one_takes_back_the_value_it_kept_and_the_head_stays_before_its_tail(tmp_path, policy):
    c = store(tmp_path, 6, policy)
    K, C, A, B = k(1), k(2), k(3), k(4)
    assert c.put(K, v(E, 1)) and c.put(C, v(E, 2), K) and c.put(A, v(E, 3)) and c.put(B, v(E, 4))
    for x in (C, A, B):
        c.pin(x)  # the host tier cannot make room: a bigger K goes to disk, keeping the host value to fall back to
    # before that write starts, another put of K lands in the host tier (over the value kept there)
    at_write_round(c, lambda: c.put(K, v(E, 9)))
    assert c.put(K, v(3 * E, 7)) is False  # called off by the later put
    for x in (C, A, B):
        c.unpin(x)
    assert c.where(K) == "host" and torch.equal(c.get(K, promote=False), v(E, 9))
    assert len(c.policies[0]) == host_entries(c) == 4  # one record for K, not two
    if policy == "prefix-lru":
        c.get(C)  # read after its head: the most recent, yet the tail goes before it
        c.relieve("host", c.tiers[0].used_bytes // 4)  # three of the four go
        assert (c.where(K), c.where(C)) == ("host", "disk")


def test_a_child_stored_while_its_heads_replace_is_pending_is_its_child_when_the_replace_fails(tmp_path, monkeypatch):
    c = store(tmp_path, 8)
    K, C = k(1), k(2)
    assert c.put(K, v(E, 1))
    failing_disk_writes(monkeypatch)
    at_write_round(c, lambda: c.put(C, v(E, 2), K))  # the child lands in the host tier, next to the kept head
    assert c.put(K, v(9 * E, 7)) is False  # too big for the host tier: disk, whose write fails; the old K stays
    assert (c.where(K), c.where(C)) == ("host", "host") and torch.equal(c.get(K, promote=False), v(E, 1))
    c.get(C, promote=False)  # the tail is the most recent
    monkeypatch.undo()  # the disk works again
    c.relieve("host", E * 4)  # one of the two must go: the tail, never the head before it
    assert (c.where(K), c.where(C)) == ("host", "disk")


def test_a_kept_value_stays_on_the_heap_through_a_rebuild_and_can_still_be_evicted(tmp_path, monkeypatch):
    c = store(tmp_path, 8)
    K = k(0)
    assert c.put(K, v(E, 1))
    real = disk_mod._write_and_hash
    state = {"fail": False}

    def flaky(fd, view, offset):
        if state["fail"]:
            raise OSError(errno.ENOSPC, "injected")
        return real(fd, view, offset)

    def traffic():  # enough puts and removes in the host tier to rebuild its policy's heap
        for i in range(1, 101):
            c.put(k(i), v(E, i))
            c.remove(k(i))
        state["fail"] = True

    monkeypatch.setattr(disk_mod, "_write_and_hash", flaky)
    at_write_round(c, traffic)
    assert c.put(K, v(20 * E, 7)) is False  # to disk, failing: the old K is back in the index
    assert c.where(K) == "host"
    state["fail"] = False
    assert c.relieve("host", 0) == E * 4 and c.where(K) == "disk"  # still a victim like any other entry
