"""vLLM engines on a 3-node Ray cluster share KV blocks through the node agents (``store="ray"``).

Each engine runs in a Ray task pinned to a node (a fresh worker process each, as Ray Data LLM and Ray Serve run
vLLM inside Ray workers). A block one engine saved is found by an engine on another node through the
coordinator's directory and moved by Ray from the holder's object store; after the holding agent restarts,
what its disk tier held is served again.
"""

from __future__ import annotations

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tests.conftest import local_cluster
from tests.test_vllm_connector import BLOCK, TEXT, assets, tokens  # noqa: F401 - the module fixture too

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.ray, pytest.mark.multinode]

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


@ray.remote(num_cpus=1, max_calls=1)  # one engine per worker process, gone with the task
def _serve(spec: dict) -> dict:
    from tests.vllm_driver import run_spec

    return run_spec(spec)


def serve_on(node_id: str, spec: dict) -> dict:
    task = _serve.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                          runtime_env={"env_vars": ENGINE_ENV})
    return ray.get(task.remote(spec), timeout=600)


def test_engines_on_other_nodes_share_blocks_through_the_agents_and_the_disk_tier_survives_a_restart(
        assets, tmp_path):
    disk = tmp_path / "kv"
    disk.mkdir(mode=0o700)
    connector = {"store": "ray", "host_bytes": "16MiB", "disk_bytes": "64MiB", "disk_dir": str(disk)}
    spec = {"model": assets["model"], "connector": connector, "conversations": [[{"text": TEXT}]], "reset": True,
            "block_size": BLOCK}
    with local_cluster(3) as cluster:
        home, other = [n.node_id for n in cluster.list_all_nodes()][1:]
        first = serve_on(home, spec)
        turn = first["turns"][0][0]
        assert turn["cached"] == 0
        [counters] = first["store"]
        full_blocks = (turn["prompt"] - 1) // BLOCK
        assert counters["saved"] >= full_blocks > 0

        # Another node: every full block comes from the first engine's node, through Ray's object transfer.
        second = serve_on(other, spec)
        assert tokens(second) == tokens(first)
        assert second["turns"][0][0]["cached"] == full_blocks * BLOCK
        [counters] = second["store"]
        assert counters["loaded"] == {"remote": full_blocks} and counters["load_failures"] == 0

        # The home agent moves its blocks to its disk tier (as under pressure), then dies and restarts.
        from actors.config import NAMESPACE
        from actors.node_agent import agent_name
        from actors.tenancy import Tenant, with_tenant

        agent = with_tenant(ray.get_actor(agent_name(home, Tenant()), namespace=NAMESPACE), Tenant())
        ray.get(agent.demote_cold.remote(1 << 30), timeout=60)
        pid = ray.get(agent.pid.remote(), timeout=60)
        ray.kill(agent.actor, no_restart=False)
        while True:  # the restarted agent answers from a new process
            try:
                if ray.get(agent.pid.remote(), timeout=60) != pid:
                    break
            except ray.exceptions.RayActorError:
                continue
        third = serve_on(home, spec)
        assert tokens(third) == tokens(first)
        assert third["turns"][0][0]["cached"] == full_blocks * BLOCK
        assert third["store"][0]["loaded"] == {"disk": full_blocks}
