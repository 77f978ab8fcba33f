"""The engine protocol is a type (``actors.engine_protocol``): ``load_engine`` accepts an engine that follows
it and names what one that does not lacks; a run's result has one shape (``EngineRun``), and a worker refuses
any other as a broken engine rather than reading keys that may be missing."""

from __future__ import annotations

import pytest

from actors.config import AgentConfig, CoordinatorConfig, WorkerConfig
from actors.coordinator import CoordinatorLogic
from actors.engine_protocol import DeviceTierEngine, EngineRun, WorkerEngine
from actors.node_agent import NodeAgentLogic
from actors.object_store_tier import LocalObjectStore
from actors.synthetic_engine import SyntheticKVEngine
from actors.worker import WorkerLogic, load_engine

NODE = "a" * 32
ARGS = dict(layers=1, kv_heads=1, head_dim=16, chunk_tokens=16)


class NoRun:
    """Keys but no ``run``: not an engine."""

    namespace = SyntheticKVEngine(**ARGS).namespace
    chunk_tokens = 16

    def request_keys(self, request):
        return []


class DictRun(SyntheticKVEngine):
    """Returns the old dict form of a run."""

    def run(self, request, keys, cached):
        out = self.prefill(request["token_ids"], keys, cached)
        return {"new_chunks": out["new_chunks"], "output": out["output"]}


def worker(engine, tmp_path) -> WorkerLogic:
    agent = NodeAgentLogic(NODE, AgentConfig(host_bytes=64 << 20, disk_bytes=0, disk_dir=str(tmp_path), policy="lru"),
                           LocalObjectStore())
    coord = CoordinatorLogic(CoordinatorConfig(recompress_codec="", period_s=0))
    coord.add_agent(NODE, agent)
    return WorkerLogic("w0", NODE, engine, {NODE: agent}.__getitem__, coord, agent.store, WorkerConfig(device_bytes=0))


def test_the_synthetic_engine_follows_the_protocol_and_keeps_no_device_tier():
    engine = load_engine("actors.synthetic_engine:SyntheticKVEngine", ARGS)
    assert isinstance(engine, WorkerEngine) and not isinstance(engine, DeviceTierEngine)
    keys = engine.request_keys({"token_ids": list(range(40))})
    run = engine.run({"token_ids": list(range(40))}, keys, [])
    # 40 tokens = 2 full chunks computed, none cached
    assert isinstance(run, EngineRun) and len(run.new_chunks) == 2 and run.prompt_tokens == 40 and run.error is None


def test_an_engine_without_a_protocol_member_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"built a NoRun without 'run'; see actors.engine_protocol.WorkerEngine"):
        load_engine(f"{__name__}:NoRun", {})


def test_a_run_in_another_shape_is_the_engines_fault_not_the_requests(tmp_path):
    w = worker(DictRun(**ARGS), tmp_path)
    with pytest.raises(TypeError, match="DictRun.run returned a dict, not an EngineRun"):
        w.process({"id": "r", "token_ids": list(range(32))})


def test_a_runs_fields_fill_the_workers_result(tmp_path):
    w = worker(SyntheticKVEngine(**ARGS), tmp_path)
    first = w.process({"id": "r", "token_ids": list(range(32))})
    again = w.process({"id": "r2", "token_ids": list(range(32))})
    assert first.prompt_tokens == 32 and first.computed_chunks == 2 and first.cached_tokens == 0
    # the second run reused both chunks from the agent's host tier and gave the same digest
    assert again.computed_chunks == 0 and again.cached_tiers == {"host": 32}
    assert again.output == first.output
