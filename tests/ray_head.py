"""A real `ray start --head` for tests: every component's port chosen here, in its own process group, stopped
with SIGTERM to that group (never `ray stop`, which would stop every Ray on the machine)."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def free_ports(names) -> dict[str, int]:
    """Distinct free ports (all held open until every one is picked, so none is handed out twice). Picked on the
    wildcard address: a port picked on 127.0.0.1 may still be held on the node's own address (Ray's processes
    listen there) by a cluster that is still stopping, and the head's component given it would fail."""
    socks = []
    try:
        for _ in names:
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return {name: s.getsockname()[1] for name, s in zip(names, socks)}
    finally:
        for s in socks:
            s.close()


PORT_FLAGS = {"gcs": "--port", "dashboard": "--dashboard-port", "metrics": "--metrics-export-port",
              "agent": "--dashboard-agent-listen-port", "agent_grpc": "--dashboard-agent-grpc-port",
              "runtime_env": "--runtime-env-agent-port", "client": "--ray-client-server-port",
              "node_manager": "--node-manager-port", "object_manager": "--object-manager-port"}


def start_head(env: dict, temp: str, log) -> tuple[subprocess.Popen, dict[str, int]]:
    """``ray start --head`` with every component's port chosen here: a port Ray picks at random for a
    component left unset can collide with one given here, which Ray refuses at start-up. Such a refusal
    (another process took a port in between) is retried with new ports."""
    for attempt in range(3):
        ports = free_ports(list(PORT_FLAGS))
        log.seek(0)
        log.truncate()
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", *(f"{PORT_FLAGS[k]}={v}" for k, v in ports.items()),
             f"--temp-dir={temp}", "--num-cpus=2", "--object-store-memory=300000000", "--include-dashboard=true",
             "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=8)  # a port refusal ends it within seconds; a healthy head blocks
        except subprocess.TimeoutExpired:
            return proc, ports
        text = Path(temp, "head.log").read_text()
        if not any(m in text for m in ("port number", "already in use")) or attempt == 2:
            return proc, ports  # exited for another reason: the caller reports its log
    raise AssertionError("unreachable")


# Run with the head's own environment (its auth mode and token): polls the GCS until a node is ALIVE.
_WAIT_FOR_NODE = r"""
import sys, time
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
client, deadline, last = GcsClient(address=sys.argv[1]), time.time() + float(sys.argv[2]), "no node yet"
while time.time() < deadline:
    try:
        if client.get_all_node_info(timeout=5, state_filter=GcsNodeInfo.GcsNodeState.ALIVE):
            sys.exit(0)
    except Exception as e:  # the GCS not answering yet
        last = repr(e)
    time.sleep(0.5)
sys.exit(f"no ALIVE node in the GCS: {last}")
"""


def head_logs(temp: str) -> str:
    """The tails of the head's own log and its GCS's and raylet's: what a failed start or wait reports."""
    logs = Path(temp, "session_latest", "logs")
    parts = []
    for path in (Path(temp, "head.log"), logs / "gcs_server.out", logs / "raylet.out"):
        text = path.read_text(errors="replace")[-3000:] if path.exists() else "(none)"
        parts.append(f"--- {path.name}\n{text}")
    return "\n".join(parts)


def wait_for_node(env: dict, gcs_port: int, timeout_s: float, temp: str) -> None:
    """Until the head's raylet has registered with its GCS. ``ray start --head --block`` never says when the
    head is up. A driver attaching earlier waits for the node inside ``ray.init`` (up to 60 s), so a raylet that
    never comes up would show only as the first test's slow failure; here it fails with the head's logs."""
    r = subprocess.run([sys.executable, "-c", _WAIT_FOR_NODE, f"127.0.0.1:{gcs_port}", str(timeout_s)], env=env,
                       capture_output=True, text=True, timeout=timeout_s + 60)
    assert r.returncode == 0, f"{r.stderr[-2000:]}\n{head_logs(temp)}"


@contextlib.contextmanager
def running_head(env: dict, wait_dashboard: bool = True):
    """A head with ``env`` (set RAY_AUTH_MODE=token and the token there for token auth) for the ``with`` block;
    yields ``(ports, temp dir)``. Its raylet has registered before the block starts; with ``wait_dashboard``,
    the dashboard answers too."""
    temp = tempfile.mkdtemp(prefix="q3r", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # nothing to drain: tear down at once
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp, "head.log"), "w")
    proc, ports = start_head(env, temp, log)
    try:
        assert proc.poll() is None, head_logs(temp)
        wait_for_node(env, ports["gcs"], 120, temp)
        deadline = time.time() + 120
        while wait_dashboard:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ports['dashboard']}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without the token): up
            except OSError:
                assert proc.poll() is None, head_logs(temp)
                assert time.time() < deadline, f"the dashboard did not answer in 120 s:\n{head_logs(temp)}"
                time.sleep(0.5)
        yield ports, temp
        # A head that died under the tests (a component's port taken late, say) is named here, with its logs,
        # rather than only as the hangs and refusals of the tests after it.
        assert proc.poll() is None, f"the head exited with {proc.returncode} during the tests:\n{head_logs(temp)}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:  # anything of this head still up after the grace period (all in its process group)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
