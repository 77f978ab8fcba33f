import os
from contextlib import contextmanager

# Tests start their own embedded Ray clusters; keep them small on 2-core machines.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

MiB = 1 << 20


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
