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
    """Distinct free ports (all held open until every one is picked, so none is handed out twice)."""
    socks = []
    try:
        for _ in names:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
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


@contextlib.contextmanager
def running_head(env: dict, wait_dashboard: bool = True):
    """A head with ``env`` (set RAY_AUTH_MODE=token and the token there for token auth) for the ``with`` block;
    yields ``(ports, temp dir)``. With ``wait_dashboard``, the dashboard answers before the block starts."""
    temp = tempfile.mkdtemp(prefix="q3r", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # nothing to drain: tear down at once
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp, "head.log"), "w")
    proc, ports = start_head(env, temp, log)
    try:
        assert proc.poll() is None, Path(temp, "head.log").read_text()[-3000:]
        deadline = time.time() + 120
        while wait_dashboard:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ports['dashboard']}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without the token): up
            except OSError:
                assert proc.poll() is None, Path(temp, "head.log").read_text()[-3000:]
                assert time.time() < deadline, "ray head did not come up in 120 s"
                time.sleep(0.5)
        yield ports, temp
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
