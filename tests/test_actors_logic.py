"""The Ray service's logic classes, driven without Ray (LocalObjectStore + agents called in-process)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from actors.config import AgentConfig, CoordinatorConfig, ServiceConfig, WorkerConfig
from actors.coordinator import ClusterSaturatedError, CoordinatorLogic
from actors.directory import Directory, TIER_CODES
from actors.node_agent import NodeAgentLogic
from actors.object_store_tier import LocalObjectStore, ObjectStoreTier
from actors.synthetic_engine import SyntheticKVEngine
from actors.worker import WorkerLogic
from actors.wire import WireChunk
from helpers_object_store import FullStore
from qwen3vl_ray.errors import CapacityError, ConfigError
from qwen3vl_ray.keys import CacheKey

NODES = ["a" * 32, "b" * 32, "c" * 32]
CHUNK = 4096  # bytes of one test chunk: 2048 bf16 values


def key(i: int) -> CacheKey:
    return CacheKey(i.to_bytes(16, "little"))


def chunk(i: int) -> torch.Tensor:
    return (torch.arange(2048, dtype=torch.float32) * 0.001 + i).to(torch.bfloat16).reshape(2, 1024)


def agent_cfg(tmp_path, host_chunks=4, disk_chunks=8, **kw) -> AgentConfig:
    return AgentConfig(host_bytes=host_chunks * CHUNK, disk_bytes=disk_chunks * CHUNK, disk_dir=str(tmp_path),
                       disk_fsync=False, **{"policy": "lru", **kw})


# -- object-store tier --------------------------------------------------------------------------
def test_object_store_tier_roundtrip_and_budget():
    tier = ObjectStoreTier(3 * CHUNK, store=LocalObjectStore())
    # 3 chunks fill the budget exactly; a 4th is refused (no room is False, not an error) and counted
    assert [tier.put(key(i), chunk(i)) for i in range(3)] == [True, True, True]
    assert tier.put(key(3), chunk(3)) is False
    assert tier.used_bytes == 3 * CHUNK and tier.stats()["rejected"] == 1
    got = tier.get_many([key(0), key(9), key(2)])
    assert torch.equal(got[0], chunk(0)) and got[1] is None and torch.equal(got[2], chunk(2))
    assert got[0].dtype == torch.bfloat16
    # replacing an entry re-accounts instead of double-counting
    assert tier.put(key(1), chunk(7)) and tier.used_bytes == 3 * CHUNK
    assert torch.equal(tier.get(key(1)), chunk(7))
    assert tier.remove(key(1)) and tier.used_bytes == 2 * CHUNK and not tier.contains(key(1))
    with pytest.raises(CapacityError, match="exceeds"):
        tier.prepare_store(key(5), torch.zeros(4 * CHUNK, dtype=torch.uint8))
    with pytest.raises(ConfigError):
        ObjectStoreTier(0)


def test_object_store_tier_packs_a_batch_into_one_slab_freed_with_its_last_entry():
    tier = ObjectStoreTier(8 * CHUNK, store=LocalObjectStore())
    # a batch of 5 is one object in the store; a batch larger than the room keeps the prefix that fits
    assert tier.put_many([(key(i), chunk(i), ) for i in range(5)]) == [True] * 5
    assert tier.stats()["slabs"] == 1 and tier.used_bytes == 5 * CHUNK
    assert tier.put_many([(key(i), chunk(i)) for i in range(10, 15)]) == [True] * 3 + [False] * 2
    # removing part of a slab frees nothing while most of it lives (the store still holds the object) ...
    tier.remove(key(0)), tier.remove(key(1))
    assert tier.used_bytes == 8 * CHUNK and tier.stats()["compactions"] == 0
    # ... once half or less lives, the survivors are re-packed and the rest returns
    tier.remove(key(2))
    assert tier.used_bytes == 5 * CHUNK and tier.stats()["compactions"] == 1
    assert torch.equal(tier.get(key(3)), chunk(3)) and torch.equal(tier.get(key(4)), chunk(4))
    tier.remove(key(3)), tier.remove(key(4))
    assert tier.used_bytes == 3 * CHUNK and tier.stats()["slabs"] == 1


def test_object_store_tier_reads_zero_copy_arrays_but_returns_owned_tensors():
    store = LocalObjectStore()
    tier = ObjectStoreTier(CHUNK, store=store)
    tier.put(key(0), chunk(0))
    entry = tier.entry(key(0))
    assert not entry.handle[entry.index].flags.writeable and entry.dtype == "bfloat16"
    t = tier.get(key(0))
    t += 1  # the caller owns its copy; the stored entry is unchanged
    assert torch.equal(tier.get(key(0)), chunk(0))


# -- directory ----------------------------------------------------------------------------------
def test_directory_follows_demotions_in_either_event_order():
    d = Directory()
    d.set_many(NODES[0], [key(1), key(2)], "host")
    host, disk = TIER_CODES["host"], TIER_CODES["disk"]
    # key 1 demoted: disk add before host remove; key 2: host remove before disk add
    d.apply_events(NODES[0], [(key(1), disk, True), (key(1), host, False), (key(2), host, False), (key(2), disk, True)])
    assert d.get(key(1)) == (NODES[0], "disk") and d.get(key(2)) == (NODES[0], "disk")
    # a newer copy on another node is not cleared by the old node's removal
    d.set_many(NODES[1], [key(1)], "host")
    d.apply_events(NODES[0], [(key(1), disk, False)])
    assert d.get(key(1)) == (NODES[1], "host")
    assert d.longest_prefix([key(1), key(2), key(3), key(2)]) == [NODES[1], NODES[0]]
    assert d.forget_node(NODES[0]) == 1 and d.get(key(2)) is None and len(d) == 1
    with pytest.raises(ValueError, match="unknown tier"):
        d.set_many(NODES[0], [key(1)], "gpu")


# -- node agent ---------------------------------------------------------------------------------
def test_agent_demotes_lru_to_disk_and_promotes_on_hit(tmp_path):
    agent = NodeAgentLogic(NODES[0], agent_cfg(tmp_path, host_chunks=3), LocalObjectStore())
    # put 4 chunks one call each into a 3-chunk host tier -> the oldest one is demoted to disk
    for i in range(4):
        agent.put_chunks([WireChunk.of(key(i), chunk(i))])
    assert agent.contains_many([key(i) for i in range(5)]) == ["disk", "host", "host", "host", None]
    # a disk hit comes back bit-exact and is promoted (pushing the next LRU entry down)
    got = agent.get_tensors([key(0), key(4)])
    assert torch.equal(got[0], chunk(0)) and got[1] is None
    assert agent.contains_many([key(0), key(1)]) == ["host", "disk"]
    assert agent.host.used_bytes <= agent.host.capacity_bytes
    # the agent counts chunks it served (status); hits and misses in tokens are the worker's (test_metrics.py)
    assert agent.stats()["served"] == {"hits": {"host": 0, "disk": 1}, "misses": 1}
    assert agent.metrics.total("qwen3vl_ray_promotions", tier="host") == 1


def test_agent_counts_a_new_value_stored_over_one_in_another_tier_as_no_swap(tmp_path):
    agent = NodeAgentLogic(NODES[0], agent_cfg(tmp_path, host_chunks=3), LocalObjectStore())
    agent.put_chunks([WireChunk.of(key(0), chunk(0))])
    assert agent.cache.demote(key(0)) and agent.contains_many([key(0)]) == ["disk"]
    assert agent.metrics.total("qwen3vl_ray_demotions", tier="host") == 1
    # a new value of the same key lands in the host tier: the disk copy is superseded, nothing came back up
    assert agent.put_chunks([WireChunk.of(key(0), chunk(5))]) == ["host"]
    assert agent.metrics.total("qwen3vl_ray_promotions", tier="host") == 0
    assert torch.equal(agent.get_tensors([key(0)])[0], chunk(5))
    # and the same value read back from disk after a real demotion is one promotion
    assert agent.cache.demote(key(0)) and agent.get_tensors([key(0)])[0] is not None
    assert agent.contains_many([key(0)]) == ["host"]
    assert agent.metrics.total("qwen3vl_ray_promotions", tier="host") == 1
    assert agent.metrics.total("qwen3vl_ray_demotions", tier="host") == 2


def test_agent_batch_larger_than_the_host_tier_is_one_slab_plus_lru_demotions(tmp_path):
    agent = NodeAgentLogic(NODES[0], agent_cfg(tmp_path, host_chunks=3), LocalObjectStore())
    # one batch of 5 into a 3-chunk host tier: the 3 that fit go into the store as one slab, the cache commits
    # all 5 in order and (LRU) demotes the oldest two to disk to make room for the last two
    assert agent.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(5)]) == ["disk"] * 2 + ["host"] * 3
    assert agent.host.used_bytes <= agent.host.capacity_bytes and agent.host.stats()["slabs_put"] == 1
    assert agent.metrics.total("qwen3vl_ray_demotions", tier="host") == 0  # they went to disk directly
    assert all(torch.equal(t, chunk(i)) for i, t in enumerate(agent.get_tensors([key(i) for i in range(5)])))
    # a batch that fits is one object in the store, committed entry by entry through the cache
    roomy = NodeAgentLogic(NODES[1], agent_cfg(tmp_path, host_chunks=8), LocalObjectStore())
    assert roomy.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(5)]) == ["host"] * 5
    assert roomy.host.stats()["slabs_put"] == 1 and roomy.cache.where(key(4)) == "host"


class CountingStore(LocalObjectStore):
    """A LocalObjectStore that counts its puts (each one is a ray.put on the real store)."""

    def __init__(self) -> None:
        self.puts = 0

    def put(self, value):
        self.puts += 1
        return super().put(value)


def chain(n: int, start: int = 0, parent: CacheKey | None = None) -> list[WireChunk]:
    """``n`` chunks of one prefix chain: each chunk's parent is the one before it."""
    items = []
    for i in range(start, start + n):
        items.append(WireChunk.of(key(i), chunk(i), parent))
        parent = key(i)
    return items


@pytest.mark.parametrize("policy", ["prefix-lru", "lru"])
def test_agent_batch_larger_than_the_host_tier_keeps_its_newest_as_one_slab_and_sends_the_rest_to_disk(tmp_path, policy):
    store = CountingStore()
    agent = NodeAgentLogic(NODES[0], agent_cfg(tmp_path, host_chunks=4, disk_chunks=32, policy=policy), store)
    # a 16-chunk chain into a 4-chunk host tier: its newest 4 are one store put, the older 12 go straight to disk
    assert agent.put_chunks(chain(16)) == ["disk"] * 12 + ["host"] * 4
    assert store.puts == 1 and agent.host.stats()["slabs_put"] == 1 and len(agent.disk) == 12
    assert agent.host.used_bytes == 4 * CHUNK
    # the next turn's 8 chunks: the host's 4 go down to disk (tail first) to make room, the new batch's newest 4
    # are again one put and its older 4 go to disk; nothing is dropped
    assert agent.put_chunks(chain(8, start=16, parent=key(15))) == ["disk"] * 4 + ["host"] * 4
    assert store.puts == 2 and agent.cache.stats()["dropped"] == 0
    assert agent.metrics.total("qwen3vl_ray_demotions", tier="host") == 4
    assert agent.metrics.total("qwen3vl_ray_swap_bytes_out", tier="host") == 4 * CHUNK
    assert agent.contains_many([key(i) for i in range(24)]) == ["disk"] * 20 + ["host"] * 4
    assert agent.host.used_bytes == 4 * CHUNK and len(agent.disk) == 20
    assert all(torch.equal(t, chunk(i)) for i, t in enumerate(agent.get_tensors([key(i) for i in range(24)])))
    # without a disk tier the host tier is the last one and keeps the batch's head, as the store's last tier
    # always does (the chain's later chunks are useless without it); still one put
    bare = NodeAgentLogic(NODES[1], agent_cfg(tmp_path, host_chunks=4, disk_chunks=0, policy=policy), CountingStore())
    assert bare.put_chunks(chain(6)) == ["host"] * 4 + [None] * 2 and bare.store.puts == 1
    assert all(torch.equal(t, chunk(i)) for i, t in enumerate(bare.get_tensors([key(i) for i in range(4)])))


@pytest.mark.parametrize("disk_chunks", [8, 0])
def test_agent_put_into_a_full_host_tier_moves_out_only_what_it_needs(tmp_path, disk_chunks):
    # the host tier is one 8-chunk slab, and a removed entry's room returns only when the tier re-packs the
    # slab's survivors: a 1-chunk put must move out one chunk, not the slab (to disk, or out without one)
    agent = NodeAgentLogic(NODES[0], agent_cfg(tmp_path, host_chunks=8, disk_chunks=disk_chunks), LocalObjectStore())
    assert agent.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(8)]) == ["host"] * 8
    assert agent.put_chunks([WireChunk.of(key(100), chunk(100))]) == ["host"]
    where = agent.contains_many([key(i) for i in range(8)])
    assert where.count("host") == 7 and agent.host.used_bytes == 8 * CHUNK
    assert where.count("disk" if disk_chunks else None) == 1
    assert agent.cache.stats()["dropped"] == (0 if disk_chunks else 1)
    # with an entry pinned (a reader holds it) the put still takes one victim, never the pinned one
    agent.cache.pin(key(7))
    assert agent.put_chunks([WireChunk.of(key(101), chunk(101))]) == ["host"]
    assert agent.contains_many([key(7)]) == ["host"] and len(agent.host) == 8
    # a re-put of chunks the host tier holds keeps them there, with the new bytes
    agent.cache.unpin(key(7))
    assert agent.put_chunks([WireChunk.of(key(7), chunk(7)), WireChunk.of(key(100), chunk(100))]) == ["host"] * 2
    assert all(torch.equal(t, chunk(i)) for i, t in zip((7, 100), agent.get_tensors([key(7), key(100)])))


def test_agent_restart_serves_disk_entries_and_misses_lost_host_entries(tmp_path):
    cfg = agent_cfg(tmp_path, host_chunks=2)
    first = NodeAgentLogic(NODES[0], cfg, LocalObjectStore())
    assert first.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(4)]) == ["disk"] * 2 + ["host"] * 2
    # the agent dies (its object store entries with it); a new one opens the same node directory
    again = NodeAgentLogic(NODES[0], cfg, LocalObjectStore())
    assert again.epoch != first.epoch
    got = again.get_tensors([key(0), key(1), key(2), key(3)])
    assert torch.equal(got[0], chunk(0)) and torch.equal(got[1], chunk(1))
    assert got[2] is None and got[3] is None  # lost host entries are misses, not errors
    # another node's directory is separate
    other = NodeAgentLogic(NODES[1], cfg, LocalObjectStore())
    assert other.contains_many([key(0)]) == [None]


def test_agent_journal_keeps_a_directory_equal_to_its_snapshot(tmp_path):
    agent = NodeAgentLogic(NODES[0], agent_cfg(tmp_path, host_chunks=2, disk_chunks=3), LocalObjectStore())
    d = Directory()
    d.apply_events(NODES[0], ((k, c, True) for k, c in agent.snapshot()["entries"]))
    for i in range(7):  # churn: demotions and disk evictions
        agent.put_chunks([WireChunk.of(key(i), chunk(i))])
        agent.get_tensors([key(max(0, i - 3))])
    d.apply_events(NODES[0], agent.drain_journal()["events"])
    expected = {k: c for k, c in agent.snapshot()["entries"]}
    assert {k: d.get(k) for k in expected} == {k: (NODES[0], "host" if c == 1 else "disk") for k, c in expected.items()}
    assert len(d) == len(expected)


def test_overflowed_journal_or_restarted_agent_is_resynced_from_a_snapshot(tmp_path):
    coord, agents = make_cluster(tmp_path, host_chunks=8)
    a = agents[NODES[0]]
    a.journal.max_events = 2  # the coordinator was away for a while: the journal overflowed
    a.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(5)])
    coord.sync_journals()
    assert coord.lookup([key(i) for i in range(5)]) == [(NODES[0], "host")] * 5
    # counted per entry resynced: the 5 came from the snapshot, not the (lost) journal
    assert coord.metrics.total("qwen3vl_ray_coordinator_actions", action="resync", node=NODES[0]) == 5
    # the agent restarts (new epoch, host entries gone): its directory part is rebuilt, not patched
    coord.agents[NODES[0]] = agents[NODES[0]] = NodeAgentLogic(NODES[0], agent_cfg(tmp_path, host_chunks=8), LocalObjectStore())
    coord.sync_journals()
    assert coord.lookup([key(0)]) == [None]


# -- coordinator --------------------------------------------------------------------------------
def make_cluster(tmp_path, config: CoordinatorConfig | None = None, **agent_kw):
    coord = CoordinatorLogic(config or CoordinatorConfig(recompress_codec="", period_s=0))
    agents = {}
    for n in NODES:
        agents[n] = NodeAgentLogic(n, agent_cfg(tmp_path, **agent_kw), LocalObjectStore())
        coord.add_agent(n, agents[n])
    return coord, agents


def test_routing_and_admission_go_on_while_a_policy_pass_waits_on_a_hung_agent(tmp_path):
    coord, agents = make_cluster(tmp_path)
    coord.register_worker("w0", NODES[0])
    agents[NODES[0]].put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(3)])
    coord.record(NODES[0], [key(i) for i in range(3)], ["host"] * 3)
    coord.policy_pass()  # budgets known (admission needs them)
    hung, release = threading.Event(), threading.Event()

    class HungPressure:  # an agent whose pressure call hangs (a dead node until Ray's timeout fires)
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def pressure(self):
            hung.set()
            assert release.wait(30)
            return self.inner.pressure()

    coord.agents[NODES[1]] = HungPressure(agents[NODES[1]])
    passing = threading.Thread(target=coord.policy_pass)
    passing.start()
    got = {}

    def serve():  # what clients and workers call meanwhile
        got["route"] = coord.route([key(i) for i in range(3)])["worker"]
        got["lookup"] = coord.lookup([key(0)])
        got["admit"] = coord.admit("s", 1)["admitted"]
        coord.done("w0")

    try:
        assert hung.wait(10)
        calls = threading.Thread(target=serve)
        calls.start()
        calls.join(20)  # (a deadlock bound: the hung agent is released only after this)
        assert not calls.is_alive() and passing.is_alive()  # they finished while the pass was still stuck
        assert got == {"route": "w0", "lookup": [(NODES[0], "host")], "admit": True}
    finally:
        release.set()
        passing.join(30)
    assert not passing.is_alive()


def test_policy_pass_demotes_cold_host_entries_to_the_low_watermark(tmp_path):
    coord, agents = make_cluster(tmp_path, host_chunks=8, high_watermark=0.7, low_watermark=0.5)
    a = agents[NODES[0]]
    a.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(7)])  # one slab; 7/8 > 0.7 high watermark
    a.get_tensors([key(0)])  # chunk 0 is now the hottest
    decisions = coord.policy_pass()
    assert [d["action"] for d in decisions] == ["demote"]
    # the 3 coldest went down; the survivors were re-packed so the slab's memory really came back
    assert a.host.used_bytes == 4 * CHUNK <= 0.5 * a.host.capacity_bytes
    assert a.contains_many([key(i) for i in range(7)]) == ["host", "disk", "disk", "disk", "host", "host", "host"]
    assert all(torch.equal(t, chunk(i)) for i, t in enumerate(a.get_tensors([key(i) for i in range(7)])))
    assert coord.lookup([key(1)]) == [(NODES[0], "disk")]
    assert coord.metrics.total("qwen3vl_ray_coordinator_actions", action="demote") == 3


def test_policy_pass_recompresses_cold_host_entries_before_demoting(tmp_path):
    cfg = CoordinatorConfig(recompress_codec="int8", recompress_max_per_pass=8, period_s=0)
    coord, agents = make_cluster(tmp_path, cfg, host_chunks=8, high_watermark=0.7, low_watermark=0.5)
    a = agents[NODES[0]]
    a.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(7)])  # 7/8 > 0.7
    # int8 halves a bf16 chunk: re-encoding the cold entries frees enough, so nothing has to leave the host
    assert [d["action"] for d in coord.policy_pass()] == ["recompress"]
    assert a.host.used_bytes <= 0.5 * a.host.capacity_bytes
    assert a.contains_many([key(i) for i in range(7)]) == ["host"] * 7
    assert a.host.entry(key(0)).codec.startswith("int8") and a.host.stats()["compression_ratio"] > 1.5
    back = a.get_tensors([key(0)])[0]
    assert back.dtype == torch.bfloat16 and torch.allclose(back.float(), chunk(0).float(), atol=0.02)


def test_cluster_eviction_drops_lowest_value_entries_first(tmp_path):
    cfg = CoordinatorConfig(recompress_codec="", demote_cold=False, period_s=0)
    coord, agents = make_cluster(tmp_path, cfg, host_chunks=2, disk_chunks=6, high_watermark=0.6, low_watermark=0.4)
    a, b = agents[NODES[0]], agents[NODES[1]]
    for i in range(6):
        a.put_chunks([WireChunk.of(key(i), chunk(i))])  # disk: 0-3, host: 4, 5
    a.get_tensors([key(0), key(1)])  # reused: promoted to host, pushing 4 and 5 down to disk
    b.put_chunks([WireChunk.of(key(10), chunk(10))])  # node b is not under pressure
    assert a.value(key(0), 0.05) > a.value(key(2), 0.05)  # reuse raises an entry's value
    decisions = coord.policy_pass()
    assert [d["action"] for d in decisions] == ["evict_by_value"]
    # node a's disk went back under its low watermark by dropping its two lowest-value (never reused,
    # oldest) entries; the reused ones and node b's entry stay
    assert a.disk.used_bytes <= 0.4 * a.disk.capacity_bytes
    assert a.contains_many([key(i) for i in range(6)]) == ["host", "host", None, None, "disk", "disk"]
    assert b.contains_many([key(10)]) == ["host"]
    assert coord.lookup([key(2), key(4)]) == [None, (NODES[0], "disk")]
    assert a.metrics.total("qwen3vl_ray_evictions") == 2


def orphans(agent: NodeAgentLogic, parents: dict, tiers=("host", "disk")) -> list[CacheKey]:
    """Stored keys (in ``tiers``) whose chain parent is not stored there: what evicting a head before its tail
    leaves behind."""
    stored = {k for k, w in zip(parents, agent.contains_many(list(parents))) if w in tiers}
    return [k for k in stored if parents[k] is not None and parents[k] not in stored]


def test_cluster_eviction_never_drops_a_chain_head_while_its_tail_stays(tmp_path):
    cfg = CoordinatorConfig(recompress_codec="", period_s=0)
    coord, agents = make_cluster(tmp_path, cfg, host_chunks=4, disk_chunks=24, high_watermark=0.6, low_watermark=0.4,
                                 policy="prefix-lru")
    a, b = agents[NODES[0]], agents[NODES[1]]
    parents: dict[str, dict] = {NODES[0]: {}, NODES[1]: {}}
    for r in range(6):
        # each round a 6-chunk chain per node (heads go to disk, tails to host), and a reread of an older chain's
        # head on node a (a short prompt sharing it): plain LRU would now find that chain's tail the coldest
        for node, agent, base in ((NODES[0], a, 100), (NODES[1], b, 200)):
            items = chain(6, start=base + 10 * r)
            agent.put_chunks(items)
            parents[node].update({c.key: c.parent for c in items})
        if r >= 2:
            a.get_tensors([key(100 + 10 * (r - 2))])
        assert all(d["action"] in ("demote", "evict_by_value") for d in coord.policy_pass())
        # after every pass: whatever was evicted, no stored chunk lost its parent on its node
        assert orphans(a, parents[NODES[0]]) == [] and orphans(b, parents[NODES[1]]) == []
        for agent in (a, b):
            assert agent.disk.used_bytes <= 0.6 * agent.disk.capacity_bytes
    # the pressure was real: both nodes evicted, through their caches' own eviction path (counted there), and
    # local room-making never had to drop anything else
    for agent in (a, b):
        assert agent.metrics.total("qwen3vl_ray_evictions") > 0
        assert agent.cache.stats()["dropped"] == agent.metrics.total("qwen3vl_ray_evictions")


def test_demote_cold_takes_a_chains_tail_before_its_head(tmp_path):
    cfg = CoordinatorConfig(recompress_codec="", cluster_eviction=False, period_s=0)
    coord, agents = make_cluster(tmp_path, cfg, host_chunks=16, disk_chunks=32, high_watermark=0.7, low_watermark=0.5,
                                 policy="prefix-lru")
    a = agents[NODES[0]]
    parents = {}
    for c in range(4):  # 4 chains of 4 chunks fill the host tier
        items = chain(4, start=10 * c)
        assert a.put_chunks(items) == ["host"] * 4
        parents.update({c.key: c.parent for c in items})
    # every chain reread head to tail, one chunk at a time: each head is now its chain's least recent chunk
    # (recency alone would demote the heads first and leave every tail in host without its prefix)
    for depth in range(4):
        a.get_tensors([key(10 * c + depth) for c in range(4)])
    assert [d["action"] for d in coord.policy_pass()] == ["demote"]
    assert a.host.used_bytes == 8 * CHUNK
    assert coord.metrics.total("qwen3vl_ray_coordinator_actions", action="demote") == 8
    # no demoted chunk is the parent of one still in the host tier: the host keeps usable prefixes
    assert orphans(a, parents, tiers=("host",)) == []
    assert a.contains_many(list(parents)).count("disk") == 8
    assert all(torch.equal(t, chunk(int.from_bytes(k, "little"))) for k, t in zip(parents, a.get_tensors(list(parents))))


def test_route_prefers_the_prefix_holder_balanced_against_load(tmp_path):
    coord, agents = make_cluster(tmp_path)
    for i, n in enumerate(NODES):
        coord.register_worker(f"w{i}", n)
    keys = [key(i) for i in range(3)]
    coord.record(NODES[1], keys, ["host"] * 3)
    assert coord.route(keys)["worker"] == "w1"
    # w1 now has 1 in flight: 3 local chunks - 4 x 1 < 0 - 0 -> the next goes to an idle worker
    assert coord.route(keys)["worker"] != "w1"
    coord.done("w1")
    assert coord.route(keys, exclude=["w1"])["worker"] != "w1"
    coord.worker_failed("w0")
    assert all(coord.route([])["worker"] != "w0" for _ in range(3))


def test_placement_sends_new_entries_to_a_node_with_room(tmp_path):
    coord, agents = make_cluster(tmp_path, host_chunks=4)
    agents[NODES[0]].put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(4)])
    coord.policy_pass()  # refreshes reports (demotes node a back under its watermark)
    agents[NODES[0]].put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(10, 14)])
    coord.reports[NODES[0]] = agents[NODES[0]].pressure()
    assert coord.place(NODES[0], CHUNK) != NODES[0]
    assert coord.place(NODES[1], CHUNK) == NODES[1]


def test_admission_rejects_with_numbers_or_queues_until_release(tmp_path):
    coord, _ = make_cluster(tmp_path)
    coord.policy_pass()
    budget = coord.total_budget()
    coord.admit("s1", int(budget * 0.9))
    with pytest.raises(ClusterSaturatedError, match="cluster saturated: session 's2' needs"):
        coord.admit("s2", int(budget * 0.2))
    coord.config = CoordinatorConfig(admission_mode="queue", admission_timeout_s=5)
    threading.Timer(0.2, coord.release, args=("s1",)).start()
    t0 = time.monotonic()
    assert coord.admit("s2", int(budget * 0.2))["admitted"]
    assert time.monotonic() - t0 >= 0.1  # it waited for the release
    assert coord.metrics.total("qwen3vl_ray_admissions", result="rejected") == 1


def test_a_sessions_reservation_is_its_largest_turn_and_wait_false_never_queues(tmp_path):
    coord, _ = make_cluster(tmp_path)
    coord.policy_pass()
    budget = coord.total_budget()
    coord.config = CoordinatorConfig(admission_mode="queue", admission_timeout_s=30)
    # each turn resends the history: turn 2 (0.6) replaces turn 1's 0.5, it does not add to it
    coord.admit("chat", int(budget * 0.5))
    coord.admit("chat", int(budget * 0.6))
    assert coord.reserved == {"chat": int(budget * 0.6)}
    # queue mode, but the caller asked not to wait: refused while "chat" still holds its room (a wait would
    # have been served by the release below, so an admitted result here would mean it queued)
    with pytest.raises(ClusterSaturatedError):
        coord.admit("other", int(budget * 0.5), wait=False)
    assert "other" not in coord.reserved
    # one that could never fit is refused at once even when waiting is allowed
    threading.Timer(0.5, coord.release, args=("chat",)).start()
    with pytest.raises(ClusterSaturatedError):
        coord.admit("huge", int(budget * 2))
    assert "huge" not in coord.reserved and "chat" in coord.reserved  # refused before the release came
    coord.release("chat")
    assert coord.admit("other", int(budget * 0.5), wait=False)["admitted"]


def test_an_abandoned_sessions_reservation_expires(tmp_path):
    coord, _ = make_cluster(tmp_path)
    coord.policy_pass()
    budget = coord.total_budget()
    coord.config = CoordinatorConfig(session_ttl_s=0.2)
    coord.admit("gone", int(budget * 0.9))
    with pytest.raises(ClusterSaturatedError):
        coord.admit("new", int(budget * 0.5))
    time.sleep(0.3)
    assert coord.admit("new", int(budget * 0.5))["admitted"]
    assert "gone" not in coord.reserved
    assert coord.metrics.total("qwen3vl_ray_coordinator_actions", action="expire_session") == 1


# -- worker ------------------------------------------------------------------------------------
def test_worker_reuses_a_prefix_cached_on_another_node(tmp_path):
    coord, agents = make_cluster(tmp_path, host_chunks=16)
    engine = SyntheticKVEngine(layers=1, kv_heads=1, head_dim=16, chunk_tokens=16)
    wcfg = WorkerConfig(device_bytes=0)
    store = agents[NODES[0]].store  # LocalObjectStore handles are arrays: readable from any "node"
    workers = [WorkerLogic(f"w{i}", n, engine, agents.__getitem__, coord, store, wcfg) for i, n in enumerate(NODES[:2])]
    prompt = {"token_ids": list(range(80))}  # 5 full chunks
    first = workers[0].process(prompt)
    assert first.cached_tokens == 0 and first.stored_chunks == 5
    second = workers[1].process(prompt)  # another node: every chunk is a cross-node hit
    assert second.cached_tokens == 80 and second.cross_node_chunks == 5 and second.computed_chunks == 0
    assert second.output == first.output  # same bytes as computing from scratch
    assert second.cached_tiers == {"remote": 80} and first.cached_tiers == {} and second.error is None
    longer = workers[1].process({"token_ids": list(range(80)) + [7] * 40})
    assert longer.cached_tokens == 80 and longer.computed_chunks == 2


def test_worker_serves_hot_chunks_from_its_own_device_tier(tmp_path):
    coord, agents = make_cluster(tmp_path, host_chunks=16)
    engine = SyntheticKVEngine(layers=1, kv_heads=1, head_dim=16, chunk_tokens=16)
    w = WorkerLogic("w0", NODES[0], engine, agents.__getitem__, coord, agents[NODES[0]].store,
                    WorkerConfig(device_bytes=1 << 20))
    first = w.process({"token_ids": list(range(48))})
    # the agent restarts empty (host entries lost): the worker still has the chunks in its device tier
    agents[NODES[0]] = NodeAgentLogic(NODES[0], agent_cfg(tmp_path / "fresh", host_chunks=16), LocalObjectStore())
    again = w.process({"token_ids": list(range(48)) + [1] * 16})
    assert again.device_chunks == 3 and again.cached_tokens == 48 and again.computed_chunks == 1
    assert again.cached_tiers == {"device": 48}
    assert w.process({"token_ids": list(range(48))}).output == first.output


def test_worker_reports_the_local_agent_tier_of_each_reused_chunk_and_the_agent_counts_them(tmp_path):
    coord, agents = make_cluster(tmp_path, host_chunks=16)
    engine = SyntheticKVEngine(layers=1, kv_heads=1, head_dim=16, chunk_tokens=16)
    prompt = {"token_ids": list(range(64))}  # 4 full chunks
    WorkerLogic("w0", NODES[0], engine, agents.__getitem__, coord, agents[NODES[0]].store,
                WorkerConfig(device_bytes=0)).process(prompt)
    holder = coord.lookup(engine.request_keys(prompt))[0][0]
    w = WorkerLogic("w1", holder, engine, agents.__getitem__, coord, agents[holder].store, WorkerConfig(device_bytes=0))
    host = w.process(prompt)
    assert host.cached_tiers == {"host": 64} and host.cached_tokens == 64 and host.cross_node_chunks == 0
    agents[holder].demote_cold(1 << 30)  # every host entry goes down to disk
    disk = w.process(prompt)
    assert disk.cached_tiers == {"disk": 64} and disk.output == host.output
    assert agents[holder].get_chunks([key(999), key(998)]) == [None, None]
    served = agents[holder].stats()["served"]
    assert served == {"hits": {"host": 4, "disk": 4}, "misses": 2}


def test_a_bad_request_is_an_error_result_and_the_worker_goes_on(tmp_path):
    coord, agents = make_cluster(tmp_path, host_chunks=16)
    engine = SyntheticKVEngine(layers=1, kv_heads=1, head_dim=16, chunk_tokens=16)
    w = WorkerLogic("w0", NODES[0], engine, agents.__getitem__, coord, agents[NODES[0]].store, WorkerConfig(device_bytes=0))
    bad = w.process({"id": "bad", "token_ids": []})
    assert bad.id == "bad" and bad.error and bad.output is None
    good = w.process({"id": "good", "token_ids": list(range(32))})
    assert good.error is None and good.output is not None
    assert w.metrics.total("qwen3vl_ray_requests", result="error") == 1
    assert w.metrics.total("qwen3vl_ray_requests", result="ok") == 1


def test_real_engine_worker_fills_tokens_and_tiers_and_returns_a_corrupt_image_as_its_error(tmp_path):
    from PIL import Image

    from actors.engine_adapter import Qwen3VLEngineAdapter
    from qwen3vl_ray.engine.checkpoint import make_checkpoint

    ckpt = make_checkpoint("tiny", tmp_path / "tiny")
    agents = {n: NodeAgentLogic(n, AgentConfig(host_bytes=64 << 20, disk_bytes=0, policy="lru"), LocalObjectStore())
              for n in NODES}
    coord = CoordinatorLogic(CoordinatorConfig(recompress_codec="", period_s=0))
    for n, a in agents.items():
        coord.add_agent(n, a)
    engine = Qwen3VLEngineAdapter(checkpoint_path=str(ckpt), chunk_tokens=16, device_tier_bytes=64 << 20)
    store = agents[NODES[0]].store
    w0, w1 = (WorkerLogic(f"w{i}", NODES[i], engine if i == 0 else
                          Qwen3VLEngineAdapter(checkpoint_path=str(ckpt), chunk_tokens=16, device_tier_bytes=64 << 20),
                          agents.__getitem__, coord, store, WorkerConfig(device_bytes=0)) for i in range(2))
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "corrupt.png").write_bytes((tmp_path / "red.png").read_bytes()[:60])
    sampling = {"max_new_tokens": 3, "temperature": 0.0}

    def req(rid, image):
        return {"id": rid, "sampling": sampling, "messages": [{"role": "user", "content": [
            {"type": "image", "image": str(tmp_path / image)},
            {"type": "text", "text": "Describe the picture in a few words, please, with the colours you see."}]}]}

    first = w0.process(req("a", "red.png"))
    bad = w0.process(req("b", "corrupt.png"))
    again = w0.process(req("c", "red.png"))  # same prompt, same worker: the engine's own device tier
    remote = w1.process(req("d", "red.png"))  # another node's worker: fetched from w0's agent
    assert bad.error and "corrupt" in bad.error and bad.id == "b"
    for r in (first, again, remote):
        assert r.error is None and r.prompt_tokens > 16 and r.completion_tokens == 3 and r.ttft_s > 0
        assert r.output == first.output
    assert first.cached_tokens == 0 and first.cached_tiers == {}
    assert again.cached_tokens > 0 and set(again.cached_tiers) == {"device"}
    # the same image after another question: its features come from the vision cache, not the encoder
    other = w0.process({"id": "e", "sampling": sampling, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What colour?"}, {"type": "image", "image": str(tmp_path / "red.png")}]}]})
    assert other.error is None and other.vision_cache_hits == 1
    assert remote.cached_tokens > 0 and sum(remote.cached_tiers.values()) == remote.cached_tokens
    holder = coord.lookup(engine.request_keys(req("a", "red.png")))[0][0]
    assert set(remote.cached_tiers) == ({"remote"} if holder != NODES[1] else {"host"})


def test_configs_validate():
    with pytest.raises(ConfigError, match="admission_mode"):
        CoordinatorConfig(admission_mode="drop")
    with pytest.raises(ConfigError, match="host_bytes"):
        AgentConfig(host_bytes=0)
    with pytest.raises(ConfigError, match="module:callable"):
        WorkerConfig(engine="nocolon")
    # the real engine is the default, also under the users' settings name; the model comes from the env
    assert WorkerConfig().engine == WorkerConfig(engine="qwen3vl").engine == "actors.engine_adapter:Qwen3VLEngineAdapter"
    # The environment is read through the users' one table of options (qwen3vl_ray.settings): the same
    # variables, parsing and defaults as the CLI and the jobs; the workers resolve the model themselves.
    env_cfg = ServiceConfig.from_env({"QWEN3VL_RAY_MODEL": "tiny", "QWEN3VL_RAY_CHECKPOINT_DIR": "/ckpts",
                                      "QWEN3VL_RAY_CHUNK_TOKENS": "64"})
    args = env_cfg.worker.engine_args
    assert (args["model"], args["checkpoint_dir"], args["chunk_tokens"]) == ("tiny", "/ckpts", 64)
    assert "checkpoint_path" not in args and args["dtype"] == "float32"  # auto: no GPU -> float32
    assert ServiceConfig.from_env({}, gpus_available=True).worker.engine_args["dtype"] == "bfloat16"
    synthetic = ServiceConfig.from_env({"QWEN3VL_RAY_ENGINE": "actors.synthetic_engine:SyntheticKVEngine",
                                        "QWEN3VL_RAY_MODEL": "tiny"})
    assert synthetic.worker.engine_args == {}  # the model setting is the real engine's only
    cfg = ServiceConfig.from_env({"QWEN3VL_RAY_HOST_BYTES": "1GiB", "QWEN3VL_RAY_ADMISSION": "queue",
                                  "QWEN3VL_RAY_WORKER_GPUS": "1"})
    assert cfg.agent.host_bytes == 1 << 30 and cfg.coordinator.admission_mode == "queue" and cfg.worker.num_gpus == 1.0
    with pytest.raises(ConfigError, match="QWEN3VL_RAY_HOST_BYTES"):
        ServiceConfig.from_env({"QWEN3VL_RAY_HOST_BYTES": "lots"})
    with pytest.raises(ConfigError, match="QWEN3VL_RAY_HOTS_BYTES"):  # a typo is an error, not ignored
        ServiceConfig.from_env({"QWEN3VL_RAY_HOTS_BYTES": "1GiB"})


def test_metrics_recorder_validates_names_and_tags_and_the_dashboard_plots_every_metric():
    import json
    import re
    from pathlib import Path

    from actors.metrics import METRICS, Metrics

    m = Metrics("n1")
    m.inc("qwen3vl_ray_hits", tier="host")
    m.inc("qwen3vl_ray_coordinator_actions", 2, action="demote")
    assert m.total("qwen3vl_ray_hits", tier="host") == 1 and m.total("qwen3vl_ray_coordinator_actions") == 2
    with pytest.raises(ValueError, match="unknown metric"):
        m.inc("hits")
    with pytest.raises(ValueError, match="takes tags"):
        m.inc("qwen3vl_ray_hits", color="red")
    dash = json.loads((Path(__file__).parent.parent / "dashboards" / "grafana_qwen3vl_ray.json").read_text())
    plotted = {name for p in dash["panels"] for t in p["targets"]
               for name in re.findall(r"ray_(qwen3vl_ray_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\{", t["expr"])}
    assert plotted == set(METRICS)


def test_worker_failed_temporarily_keeps_the_worker_routable_but_a_dead_one_is_dropped(tmp_path):
    coord, _ = make_cluster(tmp_path)
    coord.register_worker("w0", NODES[0])
    coord.register_worker("w1", NODES[1])
    coord.worker_failed("w0", permanent=False)  # ActorUnavailableError: restarting, comes back
    assert coord.state()["workers"]["w0"]["available"]
    assert "w0" in {coord.route([])["worker"] for _ in range(4)}
    coord.worker_failed("w0")  # ActorDiedError
    assert not coord.state()["workers"]["w0"]["available"]
    assert all(coord.route([])["worker"] == "w1" for _ in range(3))


def test_a_late_failure_report_does_not_drop_the_restarted_worker(tmp_path):
    coord, _ = make_cluster(tmp_path)
    coord.register_worker("w0", NODES[0])
    routed = coord.route([])
    coord.register_worker("w0", NODES[0])  # the worker died and Ray restarted it before the client's report
    coord.worker_failed("w0", True, routed["incarnation"])  # about the life that died: ignored
    assert coord.state()["workers"]["w0"]["available"]
    coord.worker_failed("w0", True, coord.route([])["incarnation"])  # the current life died
    assert not coord.state()["workers"]["w0"]["available"]


# -- config check of reused actors (get_if_exists) ---------------------------------------------
def test_config_check_names_the_differing_worker_fields():
    from actors.config_check import ConfigMismatchError, check_same_config, config_digest, worker_fields

    a = WorkerConfig(engine="actors.synthetic_engine:SyntheticKVEngine", engine_args={"model": "A", "chunk": 4})
    same = WorkerConfig(engine="actors.synthetic_engine:SyntheticKVEngine", engine_args={"chunk": 4, "model": "A"},
                        max_retries=5)  # key order and the client-side retry count do not matter
    check_same_config("worker 'w0'", worker_fields(a), worker_fields(same))
    assert config_digest(worker_fields(a)) == config_digest(worker_fields(same))
    b = WorkerConfig(engine_args={"model": "B", "chunk": 4})
    with pytest.raises(ConfigMismatchError) as err:
        check_same_config("worker 'w0'", worker_fields(a), worker_fields(b))
    msg = str(err.value)
    assert "worker.engine:" in msg and "worker.engine_args:" in msg and '"model":"B"' in msg and '"model":"A"' in msg
    assert "worker.num_cpus" not in msg
    assert isinstance(err.value, ConfigError)


def test_config_check_of_coordinator_and_agent_fields(tmp_path):
    from pathlib import Path

    from actors.config_check import ConfigMismatchError, agent_fields, check_same_config, coordinator_fields

    running = coordinator_fields(CoordinatorConfig(period_s=0.5), agent_cfg(tmp_path))
    check_same_config("the coordinator", running, coordinator_fields(CoordinatorConfig(period_s=0.5), agent_cfg(tmp_path)))
    with pytest.raises(ConfigMismatchError, match=r"agent.host_bytes: running=16384 requested=32768"):
        check_same_config("the coordinator", running,
                          coordinator_fields(CoordinatorConfig(period_s=0.5), agent_cfg(tmp_path, host_chunks=8)))
    with pytest.raises(ConfigMismatchError, match=r"coordinator.period_s"):
        check_same_config("the coordinator", running, coordinator_fields(CoordinatorConfig(), agent_cfg(tmp_path)))
    # non-JSON values (a Path) are compared by their text
    p = agent_cfg(tmp_path)
    p.disk_dir = Path(tmp_path)
    check_same_config("an agent", agent_fields(agent_cfg(tmp_path)), agent_fields(p))


def test_agent_counts_no_demotion_when_a_refused_replace_leaves_the_old_value_on_disk(tmp_path):
    store = FullStore()
    agent = NodeAgentLogic(NODES[0], agent_cfg(tmp_path, host_chunks=4), store)
    agent.put_chunks([WireChunk.of(key(0), chunk(0))])
    assert agent.cache.demote(key(0)) and agent.metrics.total("qwen3vl_ray_demotions", tier="host") == 1
    store.full = True  # the new value's slab is refused: the old value stays on disk
    assert agent.put_chunks([WireChunk.of(key(0), chunk(5))]) == [None] and agent.contains_many([key(0)]) == ["disk"]
    store.full = False
    assert torch.equal(agent.get_tensors([key(0)])[0], chunk(0))
    assert agent.metrics.total("qwen3vl_ray_demotions", tier="host") == 1


def test_agent_serves_a_disk_hit_it_cannot_put_in_the_store_as_a_miss_and_the_rest_of_the_batch(tmp_path):
    store = FullStore()
    agent = NodeAgentLogic(NODES[0], agent_cfg(tmp_path, host_chunks=4), store)
    agent.put_chunks([WireChunk.of(key(0), chunk(0))])
    assert agent.cache.demote(key(0))
    agent.put_chunks([WireChunk.of(key(1), chunk(1))])
    store.full = True  # the disk hit can go neither into the host tier nor into a transient object
    refs = agent.get_chunks([key(1), key(0)])
    assert refs[0] is not None and refs[1] is None
    assert torch.equal(agent.get_tensors([key(1)])[0], chunk(1))


def test_agent_expiring_a_whole_slab_re_packs_nothing(tmp_path):
    agent = NodeAgentLogic(NODES[0], agent_cfg(tmp_path, host_chunks=64, disk_chunks=0, idle_ttl_s=60.0),
                           LocalObjectStore(), clock=lambda: 1e9)
    assert agent.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(32)]) == ["host"] * 32
    puts = agent.host.stats()["slabs_put"]
    assert agent.expire_idle(now=1e9 + 3600) == 32 and len(agent.host) == 0
    assert agent.host.stats()["slabs_put"] == puts  # the emptied slab is dropped once, never re-packed


def test_a_re_pack_the_store_refuses_keeps_every_survivor_in_its_old_slab(tmp_path):
    store = FullStore()
    agent = NodeAgentLogic(NODES[0], agent_cfg(tmp_path, host_chunks=16, disk_chunks=0), store)
    assert agent.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(4)]) == ["host"] * 4
    used = agent.host.used_bytes
    store.full = True  # the node's object store is full for a moment
    assert agent.remove_many([key(0), key(1)]) == [True, True]  # the slab is half empty: its re-pack is refused
    assert agent.contains_many([key(2), key(3)]) == ["host", "host"]
    assert all(agent.host.contains(key(i)) for i in (2, 3)) and agent.host.used_bytes == used
    store.full = False
    got = agent.get_tensors([key(2), key(3)])
    assert torch.equal(got[0], chunk(2)) and torch.equal(got[1], chunk(3))
    # once the store has room again the next re-pack succeeds and gives the dead half back
    before = agent.host.used_bytes
    assert agent.host.compact(list(agent.host._slabs)) > 0 and agent.host.used_bytes < before
    assert torch.equal(agent.get_tensors([key(3)])[0], chunk(3))


def test_a_re_pack_never_brings_back_the_old_value_of_an_entry_replaced_meanwhile():
    store = LocalObjectStore()
    tier = ObjectStoreTier(16 * CHUNK, store=store)
    assert tier.put_many([(key(i), chunk(i)) for i in range(4)]) == [True] * 4
    assert tier.remove(key(0)) is True and tier.remove(key(1)) is True  # (re-packed at once: survivors 2, 3)
    assert tier.put_many([(key(i), chunk(i)) for i in (4, 5)]) == [True, True]
    put = store.put

    def put_then_replace(value):  # the re-pack's slab is stored; meanwhile a writer replaces key 4
        store.put = put
        handle = put(value)
        assert tier.put(key(4), chunk(9))
        return handle

    store.put = put_then_replace
    tier.recompress_slabs([key(4)], None)
    assert torch.equal(tier.get(key(4)), chunk(9)) and torch.equal(tier.get(key(5)), chunk(5))
    # the re-pack's dead copy of key 4 is charged to its slab like any removed entry's room
    assert tier.used_bytes == sum(slab.charged for slab in tier._slabs.values()) <= tier.capacity_bytes
