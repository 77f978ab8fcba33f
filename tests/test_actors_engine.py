"""The worker path with the real Qwen3-VL engine (tiny random-weight checkpoint, CPU), driven without Ray:
a prefix computed on one node is fetched by a worker on another node and reused by the engine."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("qwen3vl_ray.engine.engine", reason="the engine is not on this branch yet")

from PIL import Image  # noqa: E402

from actors.config import AgentConfig, CoordinatorConfig, WorkerConfig  # noqa: E402
from actors.coordinator import CoordinatorLogic  # noqa: E402
from actors.engine_adapter import Qwen3VLEngineAdapter  # noqa: E402
from actors.node_agent import NodeAgentLogic  # noqa: E402
from actors.object_store_tier import LocalObjectStore  # noqa: E402
from actors.worker import WorkerLogic  # noqa: E402
from qwen3vl_ray.engine.checkpoint import make_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow
NODES = ["a" * 32, "b" * 32]


def test_cross_node_prefix_reuse_with_the_real_engine_gives_the_same_answer(tmp_path):
    ckpt = make_checkpoint("tiny", tmp_path / "ckpt")
    args = dict(checkpoint_path=str(ckpt), chunk_tokens=16, device="cpu", device_tier_bytes=8 << 20)
    coord = CoordinatorLogic(CoordinatorConfig(period_s=0))
    agents = {n: NodeAgentLogic(n, AgentConfig(host_bytes=64 << 20, disk_bytes=0, disk_dir=str(tmp_path)), LocalObjectStore())
              for n in NODES}
    for n in NODES:
        coord.add_agent(n, agents[n])
    store = agents[NODES[0]].store  # in-process store handles are readable from either "node"
    workers = [WorkerLogic(f"w{i}", n, Qwen3VLEngineAdapter(**args), agents.__getitem__, coord, store,
                           WorkerConfig(device_bytes=0)) for i, n in enumerate(NODES)]
    img = Image.fromarray((np.random.RandomState(1).rand(64, 96, 3) * 255).astype("uint8"))
    req = {"messages": [{"role": "user", "content": [{"type": "image", "image": img},
                                                      {"type": "text", "text": "describe this picture in detail " * 3}]}],
           "sampling": {"max_new_tokens": 4}}
    first = workers[0].process(req)
    assert first["cached_tokens"] == 0 and first["stored_chunks"] == first["computed_chunks"] > 0
    # a worker on the other node pulls the chunks from node a's agent; its engine reuses them
    second = workers[1].process(req)
    assert second["cross_node_chunks"] == first["stored_chunks"] and second["computed_chunks"] == 0
    assert second["cached_tokens"] == 16 * first["stored_chunks"]
    assert second["output"] == first["output"]
