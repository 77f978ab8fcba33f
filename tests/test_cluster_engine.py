"""Fault tests with the REAL Qwen3-VL engine (tiny random-weight preset, CPU) on a 3-node
``ray.cluster_utils.Cluster`` on one machine: workers run the default engine (``WorkerConfig()``'s
``Qwen3VLEngineAdapter``), the client routes by keys computed without weights (``RequestKeyer``).

Answers are compared token by token against a cache-free engine run in this process. Faults are real: a
worker's process is SIGKILLed while a batch of requests is being served.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import ray  # noqa: E402
import qwen3vl_ray.engine.engine  # noqa: F401,E402 - a broken engine must fail these tests, not skip them
from PIL import Image  # noqa: E402

from actors.config import AgentConfig, CoordinatorConfig, ServiceConfig, WorkerConfig  # noqa: E402
from actors.engine_adapter import Qwen3VLEngineAdapter  # noqa: E402
from actors.service import ensure_service  # noqa: E402
from conftest import local_cluster  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.multinode, pytest.mark.slow]

MiB = 1 << 20
CHUNK = 16


def image_request(seed: int, words: int = 12, new_tokens: int = 6) -> dict:
    img = Image.fromarray((np.random.RandomState(seed).rand(64, 96, 3) * 255).astype("uint8"))
    text = " ".join(f"word{(seed * 31 + i) % 97}" for i in range(words))
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}],
            "sampling": {"max_new_tokens": new_tokens, "stop_on_eos": False}}


def text_request(seed: int, words: int = 40, new_tokens: int = 48) -> dict:
    text = " ".join(f"item{(seed * 17 + i) % 89}" for i in range(words))
    return {"messages": [{"role": "user", "content": text}], "id": seed,
            "sampling": {"max_new_tokens": new_tokens, "stop_on_eos": False}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from qwen3vl_ray.engine.checkpoint import make_checkpoint
    from qwen3vl_ray.engine.config import EngineConfig
    from qwen3vl_ray.engine.engine import Qwen3VLEngine
    from qwen3vl_ray.engine.requests import Request, SamplingParams
    from qwen3vl_ray.tiers.config import TierConfig

    ckpt = make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")
    plain = Qwen3VLEngine(ckpt, EngineConfig(chunk_tokens=CHUNK, device="cpu", prefix_cache=False, vision_cache=False,
                                             tiers=[TierConfig("device", 1 * MiB)]))

    def reference(req: dict) -> list[int]:
        """Tokens generated from scratch, no cache anywhere."""
        [r] = plain.generate([Request(messages=req["messages"], sampling=SamplingParams(**req["sampling"]))])
        assert r.error is None, r.error
        return list(r.token_ids)

    config = ServiceConfig(
        agent=AgentConfig(host_bytes=16 * MiB, disk_bytes=0, disk_dir=str(tmp_path_factory.mktemp("disk"))),
        coordinator=CoordinatorConfig(period_s=0.5, node_sync_period_s=1.0, recompress_codec=""),
        # the default engine (the real one), named by checkpoint path
        worker=WorkerConfig(engine_args=dict(model=str(ckpt), chunk_tokens=CHUNK, device="cpu",
                                             device_tier_bytes=4 * MiB), num_cpus=0.25),
    )
    with local_cluster(3):
        yield ensure_service(config, num_workers=3), reference
    plain.close()


def node_of(service, worker: str) -> str:
    return ray.get(service.workers[worker].node_id.remote())


def test_cross_node_prefix_hit_serves_the_same_tokens(setup):
    service, reference = setup
    req = image_request(1)
    want = reference(req)
    [first] = service.process([req])
    assert first.cached_tokens == 0 and first.stored_chunks == first.computed_chunks >= 2
    assert first.token_ids == want
    holder = first.node
    others = [w for w in service.workers if node_of(service, w) != holder]
    assert others, "workers were not spread over the nodes"
    # a worker on node B serves the prompt from node A's host tier (object-store transfer), computing nothing
    second = ray.get(service.workers[others[0]].process.remote(req))
    assert second.node != holder
    assert second.cross_node_chunks == first.stored_chunks and second.computed_chunks == 0
    assert second.cached_tokens == CHUNK * first.stored_chunks
    assert second.token_ids == want
    # the router (keys from the tokenizer and processor only) sends the prompt to the holder's node
    keys = service.keys_for(req)
    assert service._request_keyer() is not None  # configured from a worker's engine
    assert keys == Qwen3VLEngineAdapter.route_keys(req, **service.config.worker.engine_args)
    assert len(keys) == first.stored_chunks
    route = ray.get(service.coordinator.route.remote(keys))
    ray.get(service.coordinator.done.remote(route["worker"]))
    assert route["node"] == holder and route["local_chunks"] == len(keys)


def test_killed_worker_requests_retried_and_its_host_entries_still_served(setup):
    service, reference = setup
    early = image_request(2)
    [done] = service.process([early])
    assert done.stored_chunks >= 2
    victim = done.worker
    victim_pid = ray.get(service.workers[victim].pid.remote())
    reqs = [text_request(100 + i) for i in range(9)]
    want = [reference(r) for r in reqs]
    out: dict = {}
    job = threading.Thread(target=lambda: out.update(results=service.process(reqs)))
    job.start()
    # kill the victim once the job has routed requests to it (each worker serves its queue one at a time)
    deadline = time.monotonic() + 60
    while ray.get(service.coordinator.state.remote())["workers"][victim]["inflight"] == 0:
        assert time.monotonic() < deadline, "no request was routed to the victim"
        time.sleep(0.02)
    time.sleep(0.1)
    os.kill(victim_pid, signal.SIGKILL)
    job.join(timeout=300)
    results = out["results"]
    assert [r.token_ids for r in results] == want
    assert any(r.attempts > 1 for r in results), [(r.worker, r.attempts) for r in results]
    # the host-tier entries the dead worker produced live on in its node's agent
    survivor = next(w for w in service.workers if w != victim)
    again = ray.get(service.workers[survivor].process.remote(early))
    assert again.cached_tokens == CHUNK * done.stored_chunks and again.computed_chunks == 0
    assert again.token_ids == done.token_ids == reference(early)
