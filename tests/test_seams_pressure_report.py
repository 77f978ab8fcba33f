"""A node agent's pressure report is typed (``actors.pressure_report``): a real agent's report carries its tiers'
numbers as fields, it crosses processes as itself, the coordinator books a placement on a copy, and
``status --json`` prints it with the keys the nested dict it replaced had."""

from __future__ import annotations

import json
import pickle

import torch

from actors.config import AgentConfig
from actors.node_agent import NodeAgentLogic
from actors.pressure_report import NodeReport, TierReport
from actors.wire import WireChunk
from qwen3vl_ray.keys import CacheKey

NODE = "a" * 32
CHUNK = 4096  # bytes of one test chunk: 2048 bf16 values


def key(i: int) -> CacheKey:
    return CacheKey(i.to_bytes(16, "little"))


def chunk(i: int) -> torch.Tensor:
    return torch.full((2, 1024), float(i), dtype=torch.bfloat16)


def agent(tmp_path) -> NodeAgentLogic:
    # a 4-chunk host tier over an 8-chunk disk tier, watermarks 0.7 / 0.5
    return NodeAgentLogic(NODE, AgentConfig(host_bytes=4 * CHUNK, disk_bytes=8 * CHUNK, disk_dir=str(tmp_path),
                                            disk_fsync=False, policy="lru", high_watermark=0.7, low_watermark=0.5))


def test_a_real_agents_report_has_its_tiers_numbers_as_fields(tmp_path):
    a = agent(tmp_path)
    # 6 chunks into a 4-chunk host tier: the 2 oldest go straight to disk
    assert a.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(6)]) == ["disk"] * 2 + ["host"] * 4
    rep = a.pressure()
    assert isinstance(rep, NodeReport) and (rep.node_id, rep.epoch) == (NODE, a.epoch)
    assert list(rep.tiers) == ["host", "disk"]
    host, disk = rep.tiers["host"], rep.tiers["disk"]
    assert (host.used, host.capacity, host.entries, host.high, host.low) == (4 * CHUNK, 4 * CHUNK, 4, 0.7, 0.5)
    assert (disk.capacity, disk.entries) == (8 * CHUNK, 2) and disk.used >= 2 * CHUNK
    # full host tier: over its high watermark, 2 chunks above its low one; room is negative
    assert host.over_high and host.excess == 2 * CHUNK and host.room == 0.7 * 4 * CHUNK - 4 * CHUNK
    assert not disk.over_high or disk.system
    assert rep.host_memory[1] > 0 and list(rep.disk_free.values())[0] > 0
    assert pickle.loads(pickle.dumps(rep)) == rep  # crosses actor calls as itself


def test_a_booked_placement_changes_a_copy_not_the_report():
    rep = NodeReport(NODE, "e", {"host": TierReport(used=100, capacity=1000, entries=1, high=0.9, low=0.75)})
    booked = rep.with_used("host", 600)
    assert rep.tiers["host"].used == 100 and booked.tiers["host"].used == 600
    assert booked.tiers["host"].room == 300 and booked.node_id == NODE


def test_a_short_physical_memory_counts_as_over_high_within_budget():
    assert TierReport(used=1, capacity=1000, entries=1, high=0.9, low=0.75, system=True).over_high
    assert not TierReport(used=900, capacity=1000, entries=1, high=0.9, low=0.75).over_high


def test_status_json_keeps_the_shape_of_the_dict_report(tmp_path, monkeypatch, capsys):
    from jobs import cli, service_runner

    a = agent(tmp_path)
    a.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(3)])
    status = {"coordinator": {"nodes": [NODE], "entries": 3}, "devices": {},
              "nodes": {NODE: service_runner._merge_stats(a.pressure(), a.stats())}}
    monkeypatch.setattr(service_runner, "cluster_status", lambda address: status)
    assert cli.main(["status", "--json"]) == 0
    node = json.loads(capsys.readouterr().out)["nodes"][NODE]
    assert list(node)[:5] == ["node_id", "epoch", "tiers", "host_memory", "disk_free"]
    assert node["node_id"] == NODE and len(node["host_memory"]) == 2
    host = node["tiers"]["host"]
    assert {k: host[k] for k in ("used", "capacity", "entries", "high", "low")} == \
        {"used": 3 * CHUNK, "capacity": 4 * CHUNK, "entries": 3, "high": 0.7, "low": 0.5}
    assert isinstance(host["system"], bool)  # the machine's own RAM decides it
    assert node["tiers"]["disk"]["entries"] == 0


def test_eviction_candidates_are_typed_in_the_policys_order(tmp_path):
    from actors.pressure_report import EvictionCandidate

    a = agent(tmp_path)
    a.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(4)])
    a.get_tensors([key(0)])  # a hit: key 0 is now the most recently used and the most valuable
    got = a.candidates("host", 4, recompute_s_per_mib=0.05)
    assert all(isinstance(c, EvictionCandidate) and c.nbytes == CHUNK and c.value > 0 for c in got)
    assert [c.key for c in got] == [key(1), key(2), key(3), key(0)]  # LRU: the hit one last
    assert got[-1].value > got[0].value
    assert pickle.loads(pickle.dumps(got[0])) == got[0]
