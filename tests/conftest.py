import os
from contextlib import contextmanager

import pytest

# Tests start their own embedded Ray clusters; keep them small on 2-core machines.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

MiB = 1 << 20
_EXIT_STATUS = pytest.StashKey[int]()


@contextmanager
def local_cluster(nodes: int = 3):
    """A ``ray.cluster_utils.Cluster`` of ``nodes`` nodes on this machine (1 CPU, 80 MiB object store each),
    with this driver connected in the service's namespace, torn down afterwards.

    The nodes' workers import ``actors``, so the repository goes on PYTHONPATH for the cluster's lifetime.
    Health checks are fast, so a removed node is declared dead in about a second. Ray picks every port itself
    (a port chosen here could collide with one it picks at random for another component, which it refuses at
    start-up); the head's metrics port is read back into ``cluster.metrics_port``."""
    import ray
    from ray.cluster_utils import Cluster

    from actors.config import NAMESPACE
    from actors.service import REPO_ROOT

    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = REPO_ROOT + os.pathsep + (old_path or "")
    node_args = dict(num_cpus=1, object_store_memory=80 * MiB)
    system = {"health_check_period_ms": 300, "health_check_failure_threshold": 3, "health_check_timeout_ms": 300}
    c = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, _system_config=system, **node_args))
    try:
        for _ in range(nodes - 1):
            c.add_node(**node_args)
        ray.init(address=c.address, namespace=NAMESPACE)
        c.metrics_port = next(n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == c.head_node.node_id)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's own teardown once pytest has finished and reported.

    The test process ends up holding several native thread pools at once (torch's OpenMP, numba's OpenMP
    layer, Ray's core worker and gRPC threads, vLLM's imports); their teardown at interpreter exit crashed
    one CI run with SIGSEGV after every test had passed and the summary was printed. What the tests check
    runs in the tests (exit hooks that matter, such as a store's move to disk at exit, are tested in
    subprocesses of their own), so after the report the process exits with pytest's status directly. An
    embedded Ray still up is shut down first, so no Ray process outlives the run holding its output pipes."""
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None:
        return
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
