"""Policies hear one event per way in and out (insert, hit, miss, demote, promote, evict, delete), from the store
and from the cluster's decisions alike: a recording policy writes down what each tier's policy is told."""

from __future__ import annotations

import pytest
import torch

from actors.config import AgentConfig, CoordinatorConfig
from actors.coordinator import CoordinatorLogic
from actors.node_agent import NodeAgentLogic
from actors.object_store_tier import LocalObjectStore
from actors.wire import WireChunk
from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.keys import Namespace
from qwen3vl_ray.policies import POLICIES, ChainARCPolicy, LRUPolicy, PrefixLRUPolicy
from qwen3vl_ray.tiers.config import TierConfig

NS = Namespace(model="test-eviction-events")
ENTRY = 1024  # float32 elements: 4 KiB per entry


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def tensor(i: int) -> torch.Tensor:
    return torch.full((ENTRY,), float(i))


class Recording(PrefixLRUPolicy):
    """Leaf-first LRU that writes each event it hears into ``log`` as ``(event, key number)``."""

    name = "recording"

    def __init__(self, log: list | None = None) -> None:
        super().__init__()
        self.log = [] if log is None else log

    def _note(self, event: str, k: bytes) -> None:
        self.log.append((event, int.from_bytes(k, "little")))

    def insert(self, rec, nbytes, up=None):
        self._note("insert", rec.key)
        super().insert(rec, nbytes, up)

    def hit(self, rec):
        self._note("hit", rec.key)
        super().hit(rec)

    def miss(self, k):
        self._note("miss", k)
        super().miss(k)

    def evict(self, rec):
        self._note("evict", rec.key)
        super().evict(rec)

    def demote(self, rec):
        self._note("demote", rec.key)
        super().demote(rec)

    def promote(self, rec):
        self._note("promote", rec.key)
        super().promote(rec)

    def delete(self, rec):
        self._note("delete", rec.key)
        super().delete(rec)


def two_tier_store(tmp_path, policies, host_entries=2, disk_entries=2) -> TieredCache:
    tiers = [TierConfig("host", host_entries * ENTRY * 4, block_bytes=512),
             # a disk entry is its payload plus a small header: room for exactly disk_entries
             TierConfig("disk", disk_entries * (ENTRY * 4 + 512), path=str(tmp_path / "disk"), fsync=False)]
    return TieredCache(CacheConfig(tiers=tiers, namespace=NS, prefetch_threads=0), policies=policies)


def test_each_way_in_and_out_reaches_the_tier_policy_as_its_own_event(tmp_path):
    host, disk = Recording(), Recording()
    with two_tier_store(tmp_path, [host, disk]) as c:
        c.put(key(0), tensor(0))
        c.put(key(1), tensor(1))
        # a 3rd entry into the 2-slot host tier: the least recent one (0) goes down to disk
        c.put(key(2), tensor(2))
        assert host.log == [("insert", 0), ("insert", 1), ("demote", 0), ("insert", 2)]
        assert disk.log == [("insert", 0)]
        host.log.clear(), disk.log.clear()
        # a hit on disk is a miss for the host tier above it; the entry is promoted, pushing 1 down
        assert c.lookup(key(0))[1] == "disk"
        assert host.log == [("miss", 0), ("demote", 1), ("insert", 0)]
        # (1 arrives in disk as it is staged there, while 0 is still being moved out)
        assert disk.log == [("hit", 0), ("insert", 1), ("promote", 0)]
        host.log.clear(), disk.log.clear()
        # absent everywhere: a miss in every tier
        assert c.lookup(key(9)) == (None, None)
        assert host.log == [("miss", 9)] and disk.log == [("miss", 9)]
        host.log.clear(), disk.log.clear()
        # a caller's remove is a delete, not an eviction
        assert c.remove(key(2))
        assert host.log == [("delete", 2)] and disk.log == []
        host.log.clear(), disk.log.clear()
        # host holds 0; disk holds 1. Two more puts push 0, then 3 down; making room for 3 in the full disk tier
        # evicts its least recent entry (1) out of the cache
        c.put(key(3), tensor(3))
        c.put(key(4), tensor(4))
        c.put(key(5), tensor(5))
        assert host.log == [("insert", 3), ("demote", 0), ("insert", 4), ("demote", 3), ("insert", 5)]
        assert disk.log == [("insert", 0), ("insert", 3), ("evict", 1)]
        assert c.where(key(1)) is None and c.stats()["dropped"] == 1


def test_the_disk_tier_gives_up_an_arriving_tail_rather_than_its_parent(tmp_path):
    host, disk = Recording(), Recording()
    with two_tier_store(tmp_path, [host, disk], host_entries=1, disk_entries=2) as c:
        # a 3-chunk chain into a 1-slot host tier: its newest chunk stays on top, 0 and 1 go straight to disk
        c.put_many([(key(i), tensor(i), key(i - 1) if i else None) for i in range(3)])
        assert [c.where(key(i)) for i in range(3)] == ["disk", "disk", "host"]
        # 3 pushes 2 down into the full disk tier, whose only leaf is then 2 itself: leaf-first, it goes rather
        # than its parent (which would leave 0 alone and 2 without its prefix)
        c.put(key(3), tensor(3))
        assert [c.where(key(i)) for i in range(4)] == ["disk", "disk", None, "host"]
        assert c.longest_prefix([key(0), key(1), key(2)]) == 2
        assert disk.log[-2:] == [("insert", 2), ("evict", 2)] and c.stats()["dropped"] == 1


def test_chain_arc_counts_an_eviction_or_demotion_but_not_a_promotion_or_delete():
    # a ghost hit (a miss on a block this tier gave up) moves the penalty only if the tier chose to give it up
    for leave, learns in (("on_evict", True), ("on_demote", True), ("on_promote", False), ("on_delete", False)):
        p = ChainARCPolicy(penalty=1.0, max_penalty=2.0, step=1.0)
        p.on_insert(key(1), 1)
        p.on_insert(key(2), 1)
        getattr(p, leave)(key(1))
        p.on_miss(key(1))
        assert (p.penalty != 1.0) == learns, leave
        assert len(p) == 1


def test_a_promotion_out_of_a_chain_arc_tier_leaves_its_ghosts_alone(tmp_path):
    arc = ChainARCPolicy(penalty=1.0, max_penalty=2.0, step=1.0)
    with two_tier_store(tmp_path, [LRUPolicy(), arc], host_entries=1, disk_entries=4) as c:
        c.put(key(0), tensor(0))
        c.put(key(1), tensor(1))  # 0 goes down to disk
        assert c.lookup(key(0))[1] == "disk"  # and comes back up: the disk tier did not choose to drop it
        assert c.where(key(0)) == "host"
        arc.on_miss(key(0))  # were the promotion counted as an eviction, this would lower the penalty
        assert arc.penalty == 1.0
        # an eviction from the disk tier is remembered: 4 more puts push 0, 2, 3, 4 down into its 4 slots,
        # which evicts 1 (cold, and older than 0, a chain head that came back)
        for i in range(2, 6):
            c.put(key(i), tensor(i))
        evicted = [i for i in range(6) if c.where(key(i)) is None]
        assert evicted == [1]
        arc.on_miss(key(1))
        assert arc.penalty < 1.0


# -- the agent and the coordinator -------------------------------------------------------------------

NODES = ["a" * 32, "b" * 32]
CHUNK = 4096


def chunk(i: int) -> torch.Tensor:
    return (torch.arange(2048, dtype=torch.float32) * 0.001 + i).to(torch.bfloat16).reshape(2, 1024)


@pytest.fixture
def recorded(monkeypatch):
    """The policy name ``recording`` builds a Recording policy; returns every one built, in order (an agent
    builds its host tier's first, then its disk tier's)."""
    built: list[Recording] = []

    def factory() -> Recording:
        built.append(Recording())
        return built[-1]

    monkeypatch.setitem(POLICIES, "recording", factory)
    return built


def agent(tmp_path, node=NODES[0], host_chunks=4, disk_chunks=8, **kw) -> NodeAgentLogic:
    cfg = AgentConfig(host_bytes=host_chunks * CHUNK, disk_bytes=disk_chunks * CHUNK, disk_dir=str(tmp_path / node),
                      disk_fsync=False, policy="recording", **kw)
    return NodeAgentLogic(node, cfg, LocalObjectStore())


def test_the_agent_reports_a_miss_to_its_cache_and_policies(tmp_path, recorded):
    a = agent(tmp_path)
    host, disk = recorded
    a.put_chunks([WireChunk.of(key(1), chunk(1))])
    host.log.clear()
    assert a.get_chunks([key(1), key(7)])[1] is None
    # the hit is served by handle (a touch), the absent chunk is a miss the store counts and both tiers hear
    assert host.log == [("hit", 1), ("miss", 7)] and disk.log == [("miss", 7)]
    assert a.cache.stats()["misses"] == 1


def test_coordinator_demotions_and_evictions_are_the_policys_own_events(tmp_path, recorded):
    coord = CoordinatorLogic(CoordinatorConfig(recompress_codec="", period_s=0))
    a = agent(tmp_path, host_chunks=4, disk_chunks=10, high_watermark=0.6, low_watermark=0.4)
    coord.add_agent(NODES[0], a)
    host, disk = recorded
    # one 4-chunk chain fills the host tier, a 6-chunk chain after it sends its 2 oldest chunks straight to disk
    # and demotes the first chain down to make room
    parents = {i: (i - 1 if i not in (0, 10) else None) for i in [*range(4), *range(10, 16)]}
    a.put_chunks([WireChunk.of(key(i), chunk(i), None if parents[i] is None else key(parents[i])) for i in range(4)])
    a.put_chunks([WireChunk.of(key(i), chunk(i), None if parents[i] is None else key(parents[i])) for i in range(10, 16)])
    host.log.clear(), disk.log.clear()
    coord.policy_pass()
    # host 4/4 > 0.6: the pass demotes host entries down to 0.4 x 4 = 1.6 chunks (3 go), tail first. The disk tier
    # (9 entries with their headers, of 10 chunks' bytes) is then over 0.6 too and evicts down to 0.4 (6 go): the
    # older chain tail to head, then the newer one's tail; its head stays usable
    assert host.log == [("demote", 15), ("demote", 14), ("demote", 13)]
    assert [e for e, k in disk.log if e != "insert"] == ["evict"] * 6
    assert [k for e, k in disk.log if e == "evict"] == [3, 2, 1, 0, 15, 14]
    assert [a.contains_many([key(i)])[0] for i in range(10, 14)] == ["disk", "disk", "host", "disk"]
    assert a.cache.stats()["dropped"] == 6 == a.metrics.total("qwen3vl_ray_evictions")
