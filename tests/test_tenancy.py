"""Tenants on a shared cluster: job B cannot read, evict, overwrite, list or probe job A's cache through any
method of A's node agents, coordinator or workers, while A's own reuse still works.

A real `ray start --head` with token auth; each job is its own driver process (its own Ray job and
namespace) with its tenant in its environment, as `ray job submit --runtime-env-json` would give it. Workers
run the model-free synthetic engine, whose keys are the same for both tenants: B asks for exactly A's keys.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from actors.tenancy import Tenant, TenantError
from tests.ray_head import running_head

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
ALICE = {"QWEN3VL_RAY_TENANT": "alice", "QWEN3VL_RAY_TENANT_KEY": "alice-" + "a" * 40}
BOB = {"QWEN3VL_RAY_TENANT": "bob", "QWEN3VL_RAY_TENANT_KEY": "bob-" + "b" * 40}

SERVE = textwrap.dedent("""
    import json, sys
    import ray
    from actors.config import NAMESPACE
    from actors.service import ensure_service
    from jobs.service_runner import service_config
    from qwen3vl_ray import settings as S

    ray.init(address=sys.argv[1], namespace="job-" + sys.argv[2], logging_level="ERROR")
    s = S.resolve({"engine": "actors.synthetic_engine:SyntheticKVEngine", "host_bytes": 8 << 20,
                   "disk_bytes": 16 << 20, "worker_cpus": 0.25, "period_s": 0.0})
    handle = ensure_service(service_config(s), num_workers=1, worker_start_timeout_s=120)
    prompts = [[(7 * i + j) % 1000 for j in range(256)] for i in range(3)]
    out = [handle.process([{"id": str(i), "token_ids": p} for i, p in enumerate(prompts)]) for _ in range(2)]
    print(json.dumps([[{"output": r.output, "cached": r.cached_tokens, "error": r.error} for r in rs]
                      for rs in out]))
""")

PROBE = textwrap.dedent("""
    import inspect, json, sys
    import ray
    from actors.config import NAMESPACE
    from actors.coordinator import Coordinator
    from actors.node_agent import NodeAgent
    from actors.tenancy import Tenant, TenantError
    from actors.worker import Worker

    ray.init(address=sys.argv[1], namespace="job-probe", logging_level="ERROR")
    mine = Tenant.from_settings(__import__("qwen3vl_ray.settings", fromlist=["resolve"]).resolve({}))
    classes = {"qwen3vl_ray_agent_": NodeAgent, "qwen3vl_ray_coordinator": Coordinator,
               "qwen3vl_ray_worker_": Worker}
    outcomes = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry["namespace"] != NAMESPACE or name.endswith(mine.suffix) or f"_t{mine.id}_" in name:
            continue  # my own actors
        cls = next((c for prefix, c in classes.items() if name.startswith(prefix)), None)
        if cls is None:
            continue  # not tenant-owned (the metrics sink)
        handle = ray.get_actor(name, namespace=NAMESPACE)
        for method, fn in vars(cls).items():
            if method.startswith("_") or not inspect.isfunction(fn):
                continue
            params = [p for p in inspect.signature(fn).parameters.values()
                      if p.name not in ("self", "auth") and p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
            args = [[] if p.name in ("keys", "items", "refs") else None for p in params]
            for label, auth in (("no key", None), ("own key", mine.key), ("guessed", "")):
                try:
                    ray.get(getattr(handle, method).remote(*args, auth=auth), timeout=60)
                    result = "ALLOWED"
                except TenantError:
                    result = "refused"
                except Exception as e:
                    result = f"other: {type(e).__name__}: {e}"[:300]
                outcomes[f"{name}.{method} ({label})"] = result
    print(json.dumps(outcomes))
""")


@pytest.fixture(scope="module")
def head():
    import secrets

    # Not under Ray's temp dir, which Ray makes writable by everyone (the disk tier refuses such a parent).
    disk = tempfile.mkdtemp(prefix="q3rt-disk-")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONPATH": str(ROOT), "QWEN3VL_RAY_DISK_DIR": os.path.join(disk, "tiers")}
    try:
        with running_head(env, wait_dashboard=False) as (ports, _):
            yield env, f"127.0.0.1:{ports['gcs']}"
    finally:
        shutil.rmtree(disk, ignore_errors=True)


def _run(head, script, tenant, name):
    env, address = head
    proc = subprocess.run([sys.executable, "-c", script, address, name], env={**env, **tenant}, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_tenant_cannot_use_anothers_actors_and_each_keeps_its_reuse(head):
    alice_first = _run(head, SERVE, ALICE, "alice")
    cold, warm = alice_first
    assert all(r["error"] is None for r in cold + warm), cold + warm
    assert sum(r["cached"] for r in warm) > 0  # alice reuses her own cache

    # Bob computes exactly alice's keys (same engine, same prompts) and gets none of her cache.
    bob_cold, bob_warm = _run(head, SERVE, BOB, "bob")
    assert [r["cached"] for r in bob_cold] == [0, 0, 0]
    assert [r["output"] for r in bob_cold] == [r["output"] for r in cold]
    assert sum(r["cached"] for r in bob_warm) > 0  # and his own reuse works

    # Bob tries every method of every actor that is not his: agents, coordinator, workers, with no key, his
    # own key and an empty one. Every call is refused before it runs.
    outcomes = _run(head, PROBE, BOB, "probe")
    alice = Tenant(ALICE["QWEN3VL_RAY_TENANT"], ALICE["QWEN3VL_RAY_TENANT_KEY"])
    tried = {k for k in outcomes if alice.suffix in k or f"_t{alice.id}_" in k}
    for kind, method in (("agent", "get_chunks"), ("agent", "put_chunks"), ("agent", "remove_many"),
                         ("agent", "evict"), ("agent", "snapshot"), ("agent", "contains_many"),
                         ("agent", "candidates"), ("coordinator", "lookup"), ("coordinator", "route"),
                         ("coordinator", "state"), ("coordinator", "release"), ("worker", "process"),
                         ("worker", "service_config")):
        assert any(f"_{kind}" in k and f".{method} (own key)" in k for k in tried), (kind, method)
    not_refused = {k: v for k, v in outcomes.items() if v != "refused"}
    assert tried and not not_refused, not_refused

    # Alice's cache is intact after all that: a new driver of hers reuses it from the first request.
    again_cold, _ = _run(head, SERVE, ALICE, "alice-again")
    assert sum(r["cached"] for r in again_cold) > 0
    assert [r["output"] for r in again_cold] == [r["output"] for r in cold]


def test_a_named_tenant_needs_a_key_and_the_key_never_shows():
    with pytest.raises(Exception, match="QWEN3VL_RAY_TENANT_KEY"):
        Tenant("carol")
    t = Tenant("carol", "k" * 32)
    assert "k" * 32 not in repr(t) and t.id not in ("", Tenant("carol", "x" * 32).id)
    with pytest.raises(TenantError):
        t.check("k" * 31)
    t.check("k" * 32)
