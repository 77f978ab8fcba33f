"""The Ray service on a real multi-node cluster (ray.cluster_utils.Cluster, 3+ nodes on one machine).

One cluster per module; tests run in file order and each asserts one behaviour. Faults are real: actor
processes are SIGKILLed and a node's processes are killed with ``remove_node(allow_graceful=False)``.

Workers here run the model-free ``SyntheticKVEngine`` (named explicitly; the default is the real engine):
these tests are about the service's own machinery (agent and coordinator restarts, node removal, pressure
over budgets many times the size a tiny model would fill quickly, metrics), where a digest of every chunk's
bytes catches stale or mixed-up data as surely as a model would. The real engine's cross-node hit and
killed-worker retry are in ``test_cluster_engine.py``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import ray  # noqa: E402

from actors.config import NAMESPACE, AgentConfig, CoordinatorConfig, ServiceConfig, WorkerConfig  # noqa: E402
from actors.node_agent import agent_name  # noqa: E402
from actors.wire import WireChunk  # noqa: E402
from actors.config_check import ConfigMismatchError  # noqa: E402
from actors.service import REPO_ROOT, ensure_service  # noqa: E402
from actors.synthetic_engine import SyntheticKVEngine  # noqa: E402
from conftest import local_cluster  # noqa: E402
from qwen3vl_ray.keys import chunk_keys  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.multinode, pytest.mark.slow]

MiB = 1 << 20
CHUNK_TOKENS = 64
ENGINE_ARGS = dict(layers=2, kv_heads=2, head_dim=64, chunk_tokens=CHUNK_TOKENS)  # 64 KiB bf16 chunks
HOST, DISK = 2 * MiB, 4 * MiB
ENGINE = SyntheticKVEngine(**ENGINE_ARGS)
CHUNK_BYTES = ENGINE.chunk_bytes
SYNTHETIC = "actors.synthetic_engine:SyntheticKVEngine"


def reference(tokens: list[int]) -> str:
    """The output computed from scratch, without any cache."""
    return ENGINE.prefill(tokens, chunk_keys(ENGINE.namespace, tokens, CHUNK_TOKENS), [])["output"]


def prompt(seed: int, n_chunks: int) -> list[int]:
    return [(seed * 7919 + i) % 50_000 for i in range(n_chunks * CHUNK_TOKENS)]


def wait_for(pred, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception:  # the thing waited for may be restarting
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    config = ServiceConfig(
        agent=AgentConfig(host_bytes=HOST, disk_bytes=DISK, disk_dir=str(tmp_path_factory.mktemp("disk")),
                          disk_fsync=False, high_watermark=0.9, low_watermark=0.7),
        coordinator=CoordinatorConfig(period_s=0.5, node_sync_period_s=1.0, recompress_codec=""),
        worker=WorkerConfig(engine=SYNTHETIC, engine_args=dict(ENGINE_ARGS, compute_s_per_chunk=0.05), num_cpus=0.25),
    )
    with local_cluster(3) as c:
        yield c, ensure_service(config, num_workers=3), config


def agents_by_node():
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    return {n: ray.get_actor(agent_name(n), namespace=NAMESPACE) for n in alive}


def test_one_agent_per_node_and_ensure_service_is_idempotent(cluster):
    c, service, config = cluster
    agents = agents_by_node()
    assert len(agents) == 3
    assert {n: ray.get(a.node_id.remote()) for n, a in agents.items()} == {n: n for n in agents}
    coord_pid = ray.get(service.coordinator.pid.remote())
    again = ensure_service(config, num_workers=3)  # a second call reuses the coordinator, agents, workers
    assert ray.get(again.coordinator.pid.remote()) == coord_pid
    assert {ray.get(w.pid.remote()) for w in again.workers.values()} == {ray.get(w.pid.remote()) for w in service.workers.values()}
    assert len(agents_by_node()) == 3
    # the same names with another model: refused, naming the field, instead of answers from the running one
    other = dataclasses.replace(config, worker=dataclasses.replace(
        config.worker, engine_args=dict(config.worker.engine_args, compute_s_per_chunk=0.01)))
    with pytest.raises(ConfigMismatchError, match="worker.engine_args"):
        ensure_service(other, num_workers=3)


def test_a_second_driver_attaches_to_the_running_service(cluster):
    c, service, _ = cluster
    # what a job or the CLI does: a new process, RAY_ADDRESS set, ensure_service with its own (default) config
    code = ("from actors.service import ensure_service; import ray; s = ensure_service(num_workers=3); "
            "print('PIDS', ray.get(s.coordinator.pid.remote()), len(s.state()['nodes']))")
    env = dict(os.environ, RAY_ADDRESS=c.address)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    pids = next(line for line in out.stdout.splitlines() if line.startswith("PIDS")).split()
    assert int(pids[1]) == ray.get(service.coordinator.pid.remote()) and int(pids[2]) == 3


def test_admission_rejects_sessions_past_the_cluster_budget_with_a_clear_error(cluster):
    _, service, _ = cluster
    from actors.coordinator import ClusterSaturatedError

    ray.get(service.coordinator.policy_pass.remote())  # fresh pressure reports
    budget = service.state()["budget"]
    assert budget == 3 * (HOST + DISK)
    sid = service.admit(budget // 2)
    with pytest.raises(ClusterSaturatedError, match="cluster saturated"):
        service.admit(budget // 2 + 1)
    service.release(sid)
    service.release(service.admit(budget // 2 + 1))


def test_process_admits_requests_under_back_pressure_and_rejects_one_that_never_fits(cluster):
    _, service, _ = cluster
    ray.get(service.coordinator.policy_pass.remote())
    limit = int(0.97 * service.state()["budget"])
    per_request = SyntheticKVEngine.kv_bytes({"token_ids": prompt(0, 4)}, **ENGINE_ARGS)
    assert per_request == 4 * CHUNK_BYTES
    # another session holds all but room for two requests: a batch of six must run two at a time
    filler = service.admit(limit - int(2.5 * per_request))
    reserved: list[int] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            reserved.append(service.state()["reserved"])
            time.sleep(0.02)

    reqs = [{"id": f"r{i}", "token_ids": prompt(500 + i, 4)} for i in range(6)]
    reqs.insert(3, {"id": "too-big", "token_ids": prompt(600, 12)})  # needs 3 requests' room: never fits
    reqs.append({"id": "malformed"})  # no token_ids: its own error, before any remote call
    t = threading.Thread(target=sample)
    t.start()
    try:
        out = service.process(reqs)
    finally:
        stop.set()
        t.join()
        service.release(filler)
    by_id = {res.id: res for res in out}
    for r in reqs[:3] + reqs[4:-1]:
        assert by_id[r["id"]].error is None and by_id[r["id"]].output == reference(r["token_ids"])
    assert "ClusterSaturatedError" in by_id["too-big"].error and "cluster saturated" in by_id["too-big"].error
    assert "token_ids" in by_id["malformed"].error
    assert max(reserved) <= limit  # never overcommitted
    assert service.state()["reserved"] == 0  # every request's reservation was released, the filler too


def test_killed_agent_restarts_serves_disk_entries_and_lost_host_entries_miss(cluster):
    _, service, _ = cluster
    node, agent = sorted(agents_by_node().items())[-1]
    tokens = prompt(3, 48)  # 48 x 64 KiB = 3 MiB > 2 MiB host budget: the oldest chunks go to disk
    keys = chunk_keys(ENGINE.namespace, tokens, CHUNK_TOKENS)
    chunks = [ENGINE.chunk_kv(k) for k in keys]
    ray.get(agent.put_chunks.remote([WireChunk.of(k, t) for k, t in zip(keys, chunks)]))
    where = ray.get(agent.contains_many.remote(keys))  # now, just before the kill
    on_disk = [i for i, w in enumerate(where) if w == "disk"]
    on_host = [i for i, w in enumerate(where) if w == "host"]
    assert on_disk and on_host
    old_epoch = ray.get(agent.ping.remote())
    os.kill(ray.get(agent.pid.remote()), signal.SIGKILL)
    wait_for(lambda: ray.get(agent.ping.remote(), timeout=5) != old_epoch, what="agent restart")
    from actors.node_agent import materialize
    from actors.object_store_tier import RayObjectStore

    refs = ray.get(agent.get_chunks.remote(keys))
    tensors = materialize(refs, RayObjectStore())
    # every chunk is either served bit-exact or a miss; all that were on disk before the kill are served
    assert all(t is None or t.equal(c) for t, c in zip(tensors, chunks))
    assert all(tensors[i] is not None for i in on_disk)
    lost = [i for i, t in enumerate(tensors) if t is None]
    assert lost and set(lost) <= set(on_host)  # lost host entries are misses, not errors
    # the coordinator notices the new epoch and forgets the lost entries
    ray.get(service.coordinator.policy_pass.remote())
    locs = ray.get(service.coordinator.lookup.remote([keys[i] for i in lost]))
    assert locs == [None] * len(lost)


def test_killed_coordinator_restarts_rebuilds_and_jobs_continue(cluster):
    _, service, _ = cluster
    before = ray.get(service.coordinator.state.remote())
    assert before["entries"] > 0
    reqs = [{"token_ids": prompt(200 + i, 12)} for i in range(4)]
    old_pid = ray.get(service.coordinator.pid.remote())
    killer = threading.Timer(0.3, lambda: os.kill(old_pid, signal.SIGKILL))
    killer.start()
    results = service.process(reqs)
    killer.join()
    # the Timer's callback fails silently: prove the kill happened (a restarted coordinator has a new pid)
    wait_for(lambda: ray.get(service.coordinator.pid.remote()) != old_pid, what="coordinator restart")
    assert [res.output for res in results] == [reference(r["token_ids"]) for r in reqs]
    after = ray.get(service.coordinator.state.remote())
    assert after["nodes"] == before["nodes"] and after["entries"] > 0  # rebuilt from the agents
    assert sorted(after["workers"]) == sorted(service.workers)  # workers found again by name


def test_removed_node_entries_become_misses_and_requests_continue(cluster):
    c, service, config = cluster
    node = c.add_node(num_cpus=1, object_store_memory=80 * MiB)
    new_id = node.node_id
    wait_for(lambda: new_id in ray.get(service.coordinator.state.remote())["nodes"], what="agent on the new node")
    agent = ray.get_actor(agent_name(new_id), namespace=NAMESPACE)
    tokens = prompt(4, 4)
    keys = chunk_keys(ENGINE.namespace, tokens, CHUNK_TOKENS)
    tiers = ray.get(agent.put_chunks.remote([WireChunk.of(k, ENGINE.chunk_kv(k)) for k in keys]))
    ray.get(service.coordinator.record.remote(new_id, keys, tiers))
    assert ray.get(service.coordinator.lookup.remote(keys)) == [(new_id, "host")] * 4
    c.remove_node(node, allow_graceful=False)
    wait_for(lambda: new_id not in ray.get(service.coordinator.state.remote())["nodes"], what="node removal")
    assert ray.get(service.coordinator.lookup.remote(keys)) == [None] * 4
    [r] = service.process([{"token_ids": tokens}])
    # every routed request was marked done: no in-flight count leaks into later routing
    wait_for(lambda: all(w["inflight"] == 0 for w in service.state()["workers"].values()), what="in-flight back to 0")
    assert r.cached_tokens == 0 and r.output == reference(tokens)


def test_a_request_that_kills_every_worker_fails_alone_and_the_workers_come_back(cluster):
    _, service, config = cluster
    before = {w: ray.get(h.pid.remote()) for w, h in service.workers.items()}
    ok = [{"id": f"ok{i}", "token_ids": prompt(700 + i, 2)} for i in range(3)]
    out = service.process([ok[0], {"id": "poison", "token_ids": prompt(799, 2), "crash_worker": True}, *ok[1:]])
    by_id = {res.id: res for res in out}
    assert "WorkerFailedError" in by_id["poison"].error
    assert all(by_id[r["id"]].output == reference(r["token_ids"]) for r in ok)
    # every worker it reached was killed, restarted by Ray, registered again and serves the next batch
    after: dict = {}

    def restarted():
        after.update({w: ray.get(h.pid.remote(), timeout=10) for w, h in service.workers.items()})
        return sum(before[w] != after[w] for w in before) == config.worker.max_retries + 1

    wait_for(restarted, what="the killed workers restarted")
    wait_for(lambda: all(s["available"] for s in service.state()["workers"].values()), what="workers registered")
    again = service.process(ok)
    assert [res.output for res in again] == [reference(r["token_ids"]) for r in ok]


def test_workload_three_times_the_budgets_stays_within_every_budget(cluster):
    _, service, config = cluster
    agents = agents_by_node()
    total = len(agents) * (HOST + DISK)
    n_chunks = 3 * total // CHUNK_BYTES
    reqs = [{"token_ids": prompt(1000 + i, 16)} for i in range(n_chunks // 16 + 1)]
    samples: list = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for a in agents.values():
                try:
                    samples.append(ray.get(a.pressure.remote(), timeout=10))
                except Exception:
                    pass
            time.sleep(0.1)

    t = threading.Thread(target=sample)
    t.start()
    try:
        for i in range(0, len(reqs), 6):
            batch = reqs[i:i + 6]
            out = service.process(batch)
            assert [res.output for res in out] == [reference(r["token_ids"]) for r in batch]
    finally:
        stop.set()
        t.join()
    assert len(samples) > 3 * len(agents)
    for s in samples:
        for name, tier in s.tiers.items():
            assert tier.used <= tier.capacity + CHUNK_BYTES + 4096, (s.node_id, name, tier)
    assert sum(s.tiers["disk"].used > 0 for s in samples) > 0  # pressure really reached the disk tier


def test_metrics_reach_the_prometheus_endpoint(cluster):
    c, _, _ = cluster
    head = c.head_node.node_id
    # the head node's agent exports its tier gauges and byte counters, tagged by node and tier (hits and misses
    # are the workers', in tokens: tests/test_metrics_dashboard.py)
    want = ["ray_qwen3vl_ray_bytes_used{", "ray_qwen3vl_ray_bytes_budget{", "ray_qwen3vl_ray_swap_bytes_in_total{"]
    body = ""
    agent = agents_by_node()[head]
    k = chunk_keys(ENGINE.namespace, prompt(5, 1), CHUNK_TOKENS)
    ray.get(agent.put_chunks.remote([WireChunk.of(k[0], ENGINE.chunk_kv(k[0]))]))
    assert ray.get(agent.get_chunks.remote(k))[0] is not None  # one hit on the head node

    def exported():
        nonlocal body
        ray.get(agents_by_node()[head].pressure.remote())
        body = urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=5).read().decode()
        return all(w in body for w in want)

    try:
        wait_for(exported, timeout=60, what="qwen3vl_ray metrics on the head node's endpoint")
    except AssertionError:
        raise AssertionError([l for l in body.splitlines() if "qwen3vl" in l and not l.startswith("#")][:20]) from None
    line = next(l for l in body.splitlines() if l.startswith("ray_qwen3vl_ray_bytes_budget{") and 'tier="host"' in l)
    assert f'node="{head}"' in line and float(line.rsplit(" ", 1)[1]) == HOST
