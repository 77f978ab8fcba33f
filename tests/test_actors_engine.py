"""The worker path with the real Qwen3-VL engine (tiny random-weight checkpoint, CPU), driven without Ray:
request keys computed without weights equal the engine's own, and a prefix computed on one node is fetched
by a worker on another node and reused by the engine."""

from __future__ import annotations

import numpy as np
import pytest

import qwen3vl_ray.engine.engine  # noqa: F401,E402 - a broken engine must fail these tests, not skip them

from PIL import Image  # noqa: E402

from actors.config import AgentConfig, CoordinatorConfig, ServiceConfig, WorkerConfig  # noqa: E402
from actors.coordinator import CoordinatorLogic  # noqa: E402
from actors.engine_adapter import Qwen3VLEngineAdapter  # noqa: E402
from actors.engine_protocol import DeviceTierEngine, WorkerEngine  # noqa: E402
from actors.node_agent import NodeAgentLogic  # noqa: E402
from actors.object_store_tier import LocalObjectStore  # noqa: E402
from actors.worker import WorkerLogic, load_engine  # noqa: E402
from qwen3vl_ray.engine.checkpoint import make_checkpoint  # noqa: E402
from qwen3vl_ray.engine.request_keys import RequestKeyer  # noqa: E402

pytestmark = pytest.mark.slow
NODES = ["a" * 32, "b" * 32]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


def image_request(seed: int = 1, text: str = "describe this picture in detail " * 3) -> dict:
    img = Image.fromarray((np.random.RandomState(seed).rand(64, 96, 3) * 255).astype("uint8"))
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}],
            "sampling": {"max_new_tokens": 4}}


def test_request_keyer_keys_equal_the_keys_the_engine_stores_for_a_request_with_an_image(ckpt):
    from qwen3vl_ray.engine.config import EngineConfig
    from qwen3vl_ray.engine.engine import Qwen3VLEngine
    from qwen3vl_ray.tiers.config import TierConfig

    cfg = EngineConfig(chunk_tokens=16, device="cpu", tiers=[TierConfig("device", 8 << 20)])
    keyer = RequestKeyer(ckpt, cfg)  # processor and config.json only: no weights loaded
    req = image_request()
    keys, n_tokens = keyer.prompt_keys(req["messages"])
    assert len(keys) == n_tokens // 16 >= 2
    with Qwen3VLEngine(ckpt, cfg) as engine:
        assert keyer.namespace == engine.kv_namespace
        from qwen3vl_ray.engine.requests import SamplingParams

        [res] = engine.generate([dict(req, sampling=SamplingParams(**req["sampling"]))])
        assert res.error is None and res.metrics.prompt_tokens == n_tokens
        # every full chunk the engine stored is under exactly the keyer's key
        assert res.metrics.stored_chunks >= len(keys)
        assert all(engine.store.contains(k) for k in keys)
    # the image is part of the keys: another image with the same text gives other keys
    other = keyer.keys(image_request(seed=2)["messages"])
    assert len(other) == len(keys) and other != keys
    # another chunk size or tenant is another namespace
    assert RequestKeyer(ckpt, EngineConfig(chunk_tokens=16, device="cpu", tenant="t2",
                                           tiers=[TierConfig("device", 8 << 20)])).keys(req["messages"])[0] != keys[0]


def test_default_worker_config_runs_the_real_engine_from_a_preset_or_path(ckpt, tmp_path):
    cfg = WorkerConfig()
    assert cfg.engine == "actors.engine_adapter:Qwen3VLEngineAdapter"
    env_cfg = ServiceConfig.from_env({"QWEN3VL_RAY_MODEL": str(ckpt)})
    engine = load_engine(env_cfg.worker.engine, dict(env_cfg.worker.engine_args, chunk_tokens=16, device="cpu"))
    assert isinstance(engine, Qwen3VLEngineAdapter) and isinstance(engine, DeviceTierEngine)
    assert str(engine.engine.path) == str(ckpt)
    # a preset name is generated into checkpoint_dir, the same rule as the users' settings
    keyer = Qwen3VLEngineAdapter.keyer_for(model="tiny", checkpoint_dir=str(tmp_path), chunk_tokens=16, device="cpu")
    assert keyer.path == (tmp_path / "tiny").resolve() and keyer.namespace == engine.namespace
    # a factory returning a bare Qwen3VLEngine is wrapped in the adapter
    bare = load_engine("qwen3vl_ray.engine:Qwen3VLEngine", {"checkpoint_path": str(ckpt)})
    assert isinstance(bare, Qwen3VLEngineAdapter) and isinstance(bare, WorkerEngine)


def test_cross_node_prefix_reuse_with_the_real_engine_gives_the_same_answer(ckpt, tmp_path):
    args = dict(model=str(ckpt), chunk_tokens=16, device="cpu", device_tier_bytes=8 << 20)
    coord = CoordinatorLogic(CoordinatorConfig(period_s=0))
    agents = {n: NodeAgentLogic(n, AgentConfig(host_bytes=64 << 20, disk_bytes=0, disk_dir=str(tmp_path)), LocalObjectStore())
              for n in NODES}
    for n in NODES:
        coord.add_agent(n, agents[n])
    store = agents[NODES[0]].store  # in-process store handles are readable from either "node"
    workers = [WorkerLogic(f"w{i}", n, Qwen3VLEngineAdapter(**args), agents.__getitem__, coord, store,
                           WorkerConfig()) for i, n in enumerate(NODES)]
    assert all(w.device is None for w in workers)  # the engine's store is the device tier
    req = image_request()
    first = workers[0].process(req)
    assert first.cached_tokens == 0 and first.stored_chunks == first.computed_chunks > 0
    # routing by the keys computed client-side sends the prompt to node a
    route_keys = Qwen3VLEngineAdapter.route_keys(req, **args)
    assert route_keys == workers[0].engine.request_keys(req)
    for w in workers:
        coord.register_worker(w.worker_id, w.node_id)
    assert coord.route(route_keys)["node"] == NODES[0]
    # a worker on the other node pulls the chunks from node a's agent; its engine reuses them
    second = workers[1].process(req)
    assert second.cross_node_chunks == first.stored_chunks and second.computed_chunks == 0
    assert second.cached_tokens == 16 * first.stored_chunks
    assert second.token_ids == first.token_ids and second.output == first.output


def one_node_worker(args: dict, disk_dir) -> tuple[WorkerLogic, NodeAgentLogic]:
    """A worker running the real engine (``args``) beside one node agent (64 MiB host tier, no disk) and a
    coordinator, all in this process."""
    coord = CoordinatorLogic(CoordinatorConfig(period_s=0))
    agent = NodeAgentLogic(NODES[0], AgentConfig(host_bytes=64 << 20, disk_bytes=0, disk_dir=str(disk_dir)),
                           LocalObjectStore())
    coord.add_agent(NODES[0], agent)
    worker = WorkerLogic("w0", NODES[0], Qwen3VLEngineAdapter(**args), {NODES[0]: agent}.__getitem__, coord,
                         agent.store, WorkerConfig())
    return worker, agent


def test_a_prefix_in_the_engines_own_device_tier_is_not_fetched_from_the_agents(ckpt, tmp_path):
    args = dict(model=str(ckpt), chunk_tokens=16, device="cpu", device_tier_bytes=8 << 20)
    worker, agent = one_node_worker(args, tmp_path)
    req = image_request()
    first = worker.process(req)
    assert first.stored_chunks > 0  # shipped to the agent too
    served = agent.stats()["served"]
    again = worker.process(req)
    # every chunk came from the engine's own tier: the agent served nothing and counted no hit
    assert again.device_chunks == first.stored_chunks and again.computed_chunks == 0
    assert again.cached_tiers == {"device": 16 * first.stored_chunks}
    assert agent.stats()["served"] == served
    assert again.token_ids == first.token_ids


def test_the_client_plans_keys_and_kv_bytes_and_a_bad_sampling_value_is_that_requests_error(ckpt):
    from actors.service import ServiceHandle
    from qwen3vl_ray.engine.config import EngineConfig
    from qwen3vl_ray.engine.requests import RequestError

    handle = ServiceHandle(None, {}, ServiceConfig(worker=WorkerConfig(engine_args={"model": str(ckpt)})))
    handle._keyer = keyer = RequestKeyer(ckpt, EngineConfig(chunk_tokens=16, device="cpu"))  # as from a worker
    req = image_request()
    keys, nbytes = handle.plan(dict(req, sampling={"max_new_tokens": 5}))
    prompt_keys, prompt_tokens = keyer.prompt_keys(req["messages"])
    assert keys == prompt_keys and nbytes == (prompt_tokens + 5) * keyer.geometry.bytes_per_token
    with pytest.raises(RequestError, match="max_new_tokens must be an int >= 1"):
        handle.plan(dict(req, sampling={"max_new_tokens": -1000}))
    with pytest.raises(RequestError, match="unknown sampling parameter"):
        handle.plan(dict(req, sampling={"max_tokens": 3}))


def session_chat(seed: int, text: str) -> list:
    img = Image.fromarray((np.random.RandomState(seed).rand(64, 96, 3) * 255).astype("uint8"))
    return [{"role": "user", "content": [{"type": "text", "text": "Session preamble, fairly long text. " * 2},
                                         {"type": "image", "image": img}, {"type": "text", "text": text}]}]


def test_a_device_budget_demotion_on_the_ray_path_lands_in_the_agents_host_tier_session_tail_included(ckpt, tmp_path):
    from qwen3vl_ray.engine.reference import reference_generate

    KiB = 1 << 10
    sampling = {"max_new_tokens": 6}
    a1 = session_chat(1, "Session A, turn one.")
    n = len(Qwen3VLEngineAdapter.keyer_for(model=str(ckpt), chunk_tokens=16, device="cpu").keys(a1)) * 16 + 16
    # the budget is ~1.5x one turn's live KV (the tiny model's KV is 1 KiB per token): after A's turn its
    # entries fill most of the device tier, so B's turn only fits once idle A leaves the device
    budget = (n + 6) * KiB * 3 // 2
    args = dict(model=str(ckpt), chunk_tokens=16, device="cpu", device_tier_bytes=budget,
                kv_device_budget_bytes=budget, session_idle_s=0.0)
    worker, agent = one_node_worker(args, tmp_path)
    engine = worker.engine.engine
    assert engine.geometry.bytes_per_token == KiB and engine.store.tier_names == ["device"]

    ra = worker.process({"messages": a1, "sampling": sampling, "session_id": "A"})
    assert ra.error is None
    session = engine.sessions.get("A")
    tail = session.tail_key
    assert tail is not None and engine.store.where(tail) == "device"
    # the prompt's full chunks were written through to the agent; the tail and the answer's chunks were not
    assert agent.contains_many([tail]) == [None]
    worker_only = [k for k in session.keys if agent.contains_many([k]) == [None]]
    assert tail in worker_only

    # B's turn pushes idle A out of the device tier: what only the worker had goes down to the agent
    rb = worker.process({"messages": session_chat(2, "Session B, turn one."), "sampling": sampling, "session_id": "B"})
    assert rb.error is None
    budget_ = engine.budget
    assert budget_.lost == 0 and budget_.spilled == len(worker_only) and budget_.demoted > budget_.spilled
    assert all(engine.store.where(k) is None for k in worker_only)
    assert agent.contains_many(worker_only) == ["host"] * len(worker_only)
    # bytes are counted where they lie: the worker's device row no longer holds A's tail
    assert worker.device_stats()["used"] == engine.store.stats()["tiers"][0]["used_bytes"] <= budget

    # A's next turn brings the tail back from the agent and reuses it: tokens equal a cache-free run
    a2 = a1 + [{"role": "assistant", "content": ra.output},
               {"role": "user", "content": [{"type": "text", "text": "Session A, turn two."}]}]
    r2 = worker.process({"messages": a2, "sampling": sampling, "session_id": "A"})
    assert r2.error is None
    assert r2.token_ids == reference_generate(engine.model, engine.processor, a2, sampling["max_new_tokens"])
    tail_used = r2.engine_cached_tokens - 16 * len(session.chunk_keys)
    assert tail_used > 0  # past the full chunks: the tail was used
    assert r2.cached_tokens >= ra.prompt_tokens
    # the tail's tokens are host hits (the agent's tier held them), not the worker's device tier's
    assert r2.cached_tiers.get("device", 0) == 16 * r2.device_chunks  # the chunks B left on the device
    assert r2.cached_tiers["host"] == r2.cached_tokens - 16 * r2.device_chunks >= tail_used


def test_a_client_rebuilds_the_engines_exact_keys_from_its_routing_spec(ckpt):
    import pickle

    from actors.engine_protocol import RoutingSpec

    engine = Qwen3VLEngineAdapter(model=str(ckpt), chunk_tokens=16, device="cpu", device_tier_bytes=8 << 20)
    spec = pickle.loads(pickle.dumps(engine.routing_spec()))  # as it reaches the client through Ray
    assert isinstance(spec, RoutingSpec) and spec.fingerprint == engine.engine.fingerprint
    keyer = RequestKeyer(spec.checkpoint_path, spec.config, fingerprint=spec.fingerprint)
    req = image_request()
    assert keyer.keys(req["messages"]) == engine.request_keys(req) and len(engine.request_keys(req)) > 0
