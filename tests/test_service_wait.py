"""ensure_service's wait for workers on an autoscaling cluster: it waits while their resources are missing,
reports what it asked for and what the cluster has, starts them once a node offers the resources, and gives up
with a named error only after the configured time (leaving no pending demand behind)."""

import logging
import threading
import time

import pytest
import ray

from actors.config_check import CODE_FIELD, ConfigMismatchError, check_same_config, code_version, worker_fields
from actors.config import WorkerConfig
from actors.service import WorkersUnavailableError, wait_for_workers

pytestmark = [pytest.mark.ray, pytest.mark.multinode]


def _gpu_workers(n, prefix):
    class Placed:  # defined here so Ray ships it by value (the nodes cannot import this test module)
        def node_id(self):
            return ray.get_runtime_context().get_node_id()

    options = {}
    workers = {}
    for i in range(n):
        name = f"{prefix}{i}"
        options[name] = dict(name=name, namespace="qwen3vl_ray_wait_test", num_cpus=0.5, num_gpus=1)
        workers[name] = ray.remote(Placed).options(**options[name]).remote()
    return workers, options


@pytest.fixture
def cpu_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0,
                                                           "object_store_memory": 100 << 20})
    ray.init(address=cluster.address, namespace="qwen3vl_ray_wait_test")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_waits_for_a_gpu_node_then_starts(cpu_cluster, caplog):
    workers, options = _gpu_workers(1, "wait_gpu_")
    outcome = []

    def wait():
        try:
            wait_for_workers(workers, options, timeout_s=120, report_interval_s=1.0)
            outcome.append("started")
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            outcome.append(e)

    with caplog.at_level(logging.WARNING, logger="actors.service"):
        t = threading.Thread(target=wait)
        t.start()
        time.sleep(3.0)  # the "autoscaler" launches a GPU node after the demand appears (nodes start in the
        assert not outcome  # main thread: Ray's node start-up installs signal handlers)
        cpu_cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 << 20)
        t.join(timeout=120)
    assert outcome == ["started"]
    node = ray.get(workers["wait_gpu_0"].node_id.remote())
    assert node != cpu_cluster.head_node.node_id  # placed on the node that has the GPU
    waits = [r.getMessage() for r in caplog.records if "waiting for resources" in r.getMessage()]
    assert waits, "no progress report while waiting"
    assert "each asks {CPU: 0.5, GPU: 1}" in waits[0] and "free of {CPU: 2}" in waits[0]


def test_gives_up_after_the_timeout_naming_demand_and_cluster(cpu_cluster):
    workers, options = _gpu_workers(2, "never_gpu_")
    t0 = time.monotonic()
    with pytest.raises(WorkersUnavailableError) as err:
        wait_for_workers(workers, options, timeout_s=2.0, report_interval_s=0.5)
    assert 1.5 <= time.monotonic() - t0 < 60
    msg = str(err.value)
    assert "2 of 2 workers not started" in msg and "GPU: 1" in msg and "worker_start_timeout_s=2" in msg
    # the pending workers are removed: no demand left for the autoscaler, names free for the next try
    for name in workers:
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace="qwen3vl_ray_wait_test")


def test_a_worker_that_fails_to_start_raises_its_own_error(cpu_cluster):
    class Broken:
        def __init__(self):
            raise RuntimeError("checkpoint /nowhere has no config.json")

        def node_id(self):
            return ""

    w = ray.remote(Broken).options(num_cpus=0.5).remote()
    with pytest.raises(Exception, match="no config.json"):
        wait_for_workers({"w": w}, {"w": {"num_cpus": 0.5}}, timeout_s=60, report_interval_s=1.0)


def test_code_difference_is_named_as_such():
    wanted = worker_fields(WorkerConfig())
    assert wanted[CODE_FIELD] == f'"{code_version()}"'
    running = {**wanted, CODE_FIELD: '"0123456789abcdef"'}
    with pytest.raises(ConfigMismatchError, match="runs other qwen3vl-ray code than this job"):
        check_same_config("worker 'w0'", running, wanted)
    check_same_config("worker 'w0'", dict(wanted), wanted)  # same code, same config: no error


def test_a_service_whose_agents_cannot_start_says_why_at_once(tmp_path):
    """An unsafe disk directory (a parent anyone may write) stops every agent: ensure_service names the cause
    instead of serving with no tier at all (every request refused as 'cluster saturated')."""
    from actors.config import AgentConfig, CoordinatorConfig, ServiceConfig
    from actors.service import ServiceStartError, ensure_service
    from conftest import local_cluster

    open_parent = tmp_path / "shared"
    open_parent.mkdir()
    open_parent.chmod(0o777)
    config = ServiceConfig(agent=AgentConfig(host_bytes=8 << 20, disk_bytes=8 << 20,
                                             disk_dir=str(open_parent / "tiers")),
                           coordinator=CoordinatorConfig(period_s=0))
    with local_cluster(nodes=1):
        with pytest.raises(ServiceStartError, match=r"no node agent could start .*UnsafeDirectoryError: .*shared"):
            ensure_service(config, num_workers=0)
