"""The disk tier outlives Ray sessions: an embedded Ray run stores KV on disk, Ray goes away, and the next
embedded run (a new Ray node id) against the same disk directory serves those chunks from disk.

One subprocess per Ray run, the way two ``qwen3vl-ray`` invocations (or a restarted node) would be. Workers
run the model-free ``SyntheticKVEngine``: its output is a digest of every chunk's bytes, so a disk hit that
served wrong bytes would change the output.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent("""
    import json, sys
    import ray
    from actors.config import NAMESPACE, AgentConfig, CoordinatorConfig, ServiceConfig, WorkerConfig
    from actors.node_agent import agent_name
    from actors.service import REPO_ROOT, ensure_service

    disk_dir = sys.argv[1]
    ray.init(address="local", namespace=NAMESPACE, num_cpus=2, object_store_memory=80 << 20,
             include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": REPO_ROOT}})
    args = dict(layers=2, kv_heads=2, head_dim=32, chunk_tokens=64)  # 32 KiB bf16 chunks
    config = ServiceConfig(
        # a 4-chunk host tier: most of what the run stores is demoted to the disk tier
        agent=AgentConfig(host_bytes=128 << 10, disk_bytes=4 << 20, disk_dir=disk_dir, disk_fsync=False),
        coordinator=CoordinatorConfig(period_s=0.5, recompress_codec="", demote_cold=False),  # no moves behind our back
        worker=WorkerConfig(engine="actors.synthetic_engine:SyntheticKVEngine", engine_args=args, num_cpus=0.25))
    service = ensure_service(config, num_workers=1)
    node = ray.get_runtime_context().get_node_id()
    reqs = [{"id": str(i), "token_ids": [(i * 7919 + t) % 50_000 for t in range(4 * 64)]} for i in range(6)]
    results = [service.process([r])[0] for r in reqs]  # one at a time: a fixed order of puts and demotions
    stats = ray.get(ray.get_actor(agent_name(node), namespace=NAMESPACE).stats.remote())
    print("RESULT", json.dumps({
        "node": node, "errors": [r.error for r in results], "outputs": [r.output for r in results],
        "cached_tiers": [r.cached_tiers or {} for r in results],
        "served_hits": stats["served"]["hits"], "disk": {k: stats["disk"][k] for k in ("path", "recovered", "entries")}}))
    ray.shutdown()
""")


def run_once(disk_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", RUN, str(disk_dir)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


def wait_unheld(home: Path, timeout_s: float = 60.0) -> None:
    """Ray's shutdown ends the agent's process a moment after the driver exits; its flock goes with it."""
    deadline = time.monotonic() + timeout_s
    fd = os.open(home / "lock", os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{home} still held {timeout_s} s after Ray shut down"
                time.sleep(0.2)
    finally:
        os.close(fd)  # releases the probe's lock too


def test_a_second_embedded_ray_serves_the_first_runs_disk_entries(tmp_path):
    disk_dir = tmp_path / "disk"
    first = run_once(disk_dir)
    assert first["errors"] == [None] * 6
    # a fresh disk directory: nothing recovered, nothing cached; the 4-chunk host tier pushed chunks to disk
    assert first["disk"]["recovered"] == 0 and first["disk"]["entries"] >= 12
    assert all(not t for t in first["cached_tiers"])
    home = Path(first["disk"]["path"]).parent
    assert home.parent == disk_dir and home.name.startswith("machine-") and home.name.endswith("-0")
    wait_unheld(home)

    second = run_once(disk_dir)
    # a new Ray session (new node id), the same home on disk: what the first run stored is served from disk
    assert second["node"] != first["node"]
    assert second["disk"]["path"] == first["disk"]["path"]
    assert second["disk"]["recovered"] == first["disk"]["entries"]
    assert second["errors"] == [None] * 6
    assert second["served_hits"]["disk"] > 0
    assert sum(t.get("disk", 0) for t in second["cached_tiers"]) > 0
    # bit-exact: every output (a digest of all its chunks' bytes) equals the first run's, computed cold
    assert second["outputs"] == first["outputs"]
    # no directory per Ray session piles up
    assert sorted(p.name for p in disk_dir.iterdir() if p.is_dir()) == [home.name]
