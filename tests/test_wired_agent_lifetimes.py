"""Idle expiry in the node agent (``AgentConfig.idle_ttl_s``), driven as in the service: each coordinator policy
pass reads the agent's pressure, the agent expires its idle host and disk entries, and the same pass's journal
sync removes them from the directory. Ray-free: the agent and coordinator logic called in-process, the clock
scripted."""

from __future__ import annotations

import pytest
import torch

from actors.config import AgentConfig, CoordinatorConfig
from actors.coordinator import CoordinatorLogic
from actors.node_agent import NodeAgentLogic
from actors.object_store_tier import LocalObjectStore
from actors.wire import WireChunk
from qwen3vl_ray.cache.lifetimes import LifetimeConfig, LifetimeManager
from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.keys import CacheKey

NODE = "a" * 32
CHUNK = 4096  # bytes of one test chunk


def key(i: int) -> CacheKey:
    return CacheKey(i.to_bytes(16, "little"))


def chunk(i: int) -> torch.Tensor:
    return (torch.arange(2048, dtype=torch.float32) * 0.001 + i).to(torch.bfloat16).reshape(2, 1024)


class Clock:
    """Monotonic seconds, moved by the test."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def cluster(tmp_path, idle_ttl_s: float) -> tuple[CoordinatorLogic, NodeAgentLogic, Clock]:
    clock = Clock()
    cfg = AgentConfig(host_bytes=8 * CHUNK, disk_bytes=8 * CHUNK, disk_dir=str(tmp_path), disk_fsync=False,
                      policy="lru", idle_ttl_s=idle_ttl_s)
    agent = NodeAgentLogic(NODE, cfg, LocalObjectStore(), clock=clock)
    agent.cache.manager._clock = clock  # the cache stamps accesses with its own clock: the same scripted one
    coord = CoordinatorLogic(CoordinatorConfig(recompress_codec="", period_s=0))
    coord.add_agent(NODE, agent)
    return coord, agent, clock


def test_a_policy_pass_expires_idle_host_and_disk_entries_and_the_directory_forgets_them(tmp_path):
    coord, agent, clock = cluster(tmp_path, idle_ttl_s=60)
    keys = [key(i) for i in range(5)]
    # chunks 0 and 1 are written and demoted to disk; 2 and 3 are written to the host tier (never above half full:
    # no relief moves anything)
    agent.put_chunks([WireChunk.of(key(i), chunk(i)) for i in (0, 1)])
    agent.demote_cold(2 * CHUNK)
    agent.put_chunks([WireChunk.of(key(i), chunk(i)) for i in (2, 3)])
    assert agent.contains_many(keys[:4]) == ["disk", "disk", "host", "host"]

    # 30 s later: chunk 1 (disk: promoted by the read) and chunk 3 (host) are read, chunk 4 is written
    clock.t += 30
    assert all(t is not None for t in agent.get_tensors([key(1), key(3)]))
    agent.put_chunks([WireChunk.of(key(4), chunk(4))])
    coord.policy_pass()  # nothing is idle for 60 s yet
    assert coord.lookup(keys) == [(NODE, "disk"), (NODE, "host"), (NODE, "host"), (NODE, "host"), (NODE, "host")]

    # 70 s after the first writes: chunk 0 (disk) and chunk 2 (host) were never touched again and go; the
    # entries used 40 s ago stay
    clock.t += 40
    coord.policy_pass()
    assert agent.contains_many(keys) == [None, "host", None, "host", "host"]
    assert coord.lookup(keys) == [None, (NODE, "host"), None, (NODE, "host"), (NODE, "host")]
    assert agent.stats()["cache"]["expired"] == 2
    assert agent.get_tensors([key(0), key(2)]) == [None, None]  # misses now, not errors
    assert all(torch.equal(t, chunk(i)) for i, t in zip((1, 3, 4), agent.get_tensors([key(1), key(3), key(4)])))
    # what the agent values entries by (hits, recency, chain parent) is the cache's record: gone with them
    assert [agent.cache.entry_info(key(i)) is None for i in range(5)] == [True, False, True, False, False]


def test_without_a_ttl_nothing_expires(tmp_path):
    coord, agent, clock = cluster(tmp_path, idle_ttl_s=0)  # the default
    assert AgentConfig().idle_ttl_s == 0
    agent.put_chunks([WireChunk.of(key(i), chunk(i)) for i in range(2)])
    clock.t += 10 ** 6
    coord.policy_pass()
    assert coord.lookup([key(0), key(1)]) == [(NODE, "host")] * 2
    assert agent.stats()["cache"]["expired"] == 0 and agent.lifetimes.scans == 0


def test_a_frequent_caller_scans_at_most_once_per_eighth_of_the_ttl(tmp_path):
    _, agent, clock = cluster(tmp_path, idle_ttl_s=80)
    agent.pressure(), agent.pressure()  # two reads in one pass: one scan
    assert agent.lifetimes.scans == 1
    clock.t += 9.9
    agent.pressure()
    assert agent.lifetimes.scans == 1
    clock.t += 0.1  # 10 s = 80 / 8 after the last scan
    agent.pressure()
    assert agent.lifetimes.scans == 2


def test_lifetime_and_agent_configs_refuse_a_negative_ttl():
    with pytest.raises(ConfigError, match="idle_ttl_s"):
        AgentConfig(idle_ttl_s=-1)
    with pytest.raises(ConfigError, match="idle_ttl_s"):
        LifetimeConfig(idle_ttl_s=0)
    assert LifetimeManager(cache=None).tick(now=1e9) == 0  # off: never touches the cache
