"""cluster.yaml's own commands, run on this machine the way `ray up` runs them, bring up a working cluster.

Each command of ``initialization_commands``, ``setup_commands``, ``head_setup_commands`` and
``head_start_ray_commands`` runs in its own login shell, wrapped exactly as the launcher wraps it (Ray's own
``_with_interactive`` / ``_with_environment_variables``), then ``worker_start_ray_commands`` start a second
node, and the README's job commands run from a "laptop" home. What is mapped, and why:

- paths: ``/mnt/nvme`` and the job's ``/tmp/out.parquet`` go under a temp dir; every node's ``~`` is a temp
  home (``file_mounts``: the repository as ``~/qwen3vl-ray``, the laptop's token as ``~/.ray/auth_token``);
- ``sudo`` runs the command as is (a shim: the test already owns the temp dir), ``python3`` is a venv made
  here over the test's own (so ``pip install -e`` installs into it, never into the test's environment);
- the docker container is not started: the commands run directly on this machine, which has the image's
  Python (3.11) and Ray (2.60.0);
- the second node shares the head's machine and home, so its ``setup_commands`` already ran, its ``ray stop``
  is skipped (it would stop the head too), its per-node agents get free ports instead of the fixed defaults
  the head holds, it gets a Ray temp dir of its own (a real node has its own ``/tmp/ray``; two raylets in one
  session directory share one runtime-env cache, where each node's agent unpacks and garbage-collects the
  job's working dir on its own, which a real cluster never does), and the launcher's resource override for
  it declares two GPUs (this machine has none; a g5/g6 node has them), so that the job's GPU workers are
  placed there as on the real cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.ray_head import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.multinode]

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DASHBOARD = "http://127.0.0.1:8265"


def _readme_cluster_commands() -> list[str]:
    """The shell commands of the README's "Quickstart on a cluster" block (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart on a cluster"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands, current = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line)  # trailing comments
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                commands.append(current.strip())
            current = ""
    return commands


class Machine:
    """This machine as the cluster launcher sees a node: a home, a PATH, commands run the launcher's way."""

    def __init__(self, tmp: Path, log: Path):
        self.tmp = tmp
        self.home = tmp / "node-home"
        self.nvme = tmp / "nvme"
        self.bin = tmp / "shims"
        self.venv = tmp / "node-venv"
        self.log = log.open("w")  # every command and its output, kept by pytest after a failure
        for d in (self.home, self.nvme, self.bin):
            d.mkdir()
        sudo = self.bin / "sudo"
        sudo.write_text('#!/bin/sh\nexec "$@"\n')
        sudo.chmod(0o755)
        # The node's python3: a venv over the test's environment (a .pth adds its site-packages), so the YAML's
        # `pip install` commands find torch and Ray installed and install the project into this venv only.
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)], check=True)  # pip too comes from the test env
        site = next(self.venv.glob("lib/python3*/site-packages"))
        parent = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
        (site / "zz_test_env.pth").write_text(f"import site; site.addsitedir({str(parent)!r})\n")
        # The image's own ~/.bashrc puts its Python first on PATH (a login shell resets PATH from /etc/profile).
        (self.home / ".bashrc").write_text(f"export PATH={self.path()}:$PATH\n")

    def path(self) -> str:
        return os.pathsep.join([str(self.bin), str(self.venv / "bin"), str(VENV_BIN)])

    def env(self, home: Path) -> dict:
        return {"HOME": str(home), "USER": os.environ.get("USER", "root"), "LANG": "C.UTF-8", "TERM": "dumb",
                "PATH": os.pathsep.join([self.path(), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])}

    def laptop(self, cmd: str, home: Path, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        """A command the user types on their machine (a plain shell in the repository)."""
        return self._run(["bash", "-c", cmd], cmd, home, ROOT, timeout, check)

    def map_paths(self, cmd: str) -> str:
        return cmd.replace("/mnt/nvme", str(self.nvme))

    def run(self, cmd: str, env_vars: dict | None = None, home: Path | None = None, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
        """One command in its own login shell, wrapped as the launcher's SSH runner wraps it."""
        from ray.autoscaler._private.command_runner import _with_environment_variables, _with_interactive

        wrapped = " ".join(_with_interactive(_with_environment_variables(self.map_paths(cmd), env_vars or {})))
        return self._run(["/bin/sh", "-c", wrapped], cmd, home or self.home, home or self.home, timeout, check)

    def _run(self, argv: list[str], cmd: str, home: Path, cwd: Path, timeout: float, check: bool):
        self.log.write(f"\n$ {cmd}\n")
        self.log.flush()
        t0 = time.monotonic()
        # Output to files, not pipes: `ray start` leaves daemons holding its stdout/stderr, and a pipe held open
        # would keep run() waiting after the command itself has returned.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            rc = subprocess.run(argv, env=self.env(home), cwd=cwd, stdout=out, stderr=err, timeout=timeout,
                                stdin=subprocess.DEVNULL).returncode
            out.seek(0)
            err.seek(0)
            proc = subprocess.CompletedProcess(argv, rc, out.read(), err.read())
        self.log.write(f"{proc.stdout}{proc.stderr}[rc={rc}, {time.monotonic() - t0:.1f} s]\n")
        self.log.flush()
        if check and proc.returncode != 0:
            raise AssertionError(f"command failed ({proc.returncode}): {cmd}\n--- stdout\n{proc.stdout[-3000:]}\n"
                                 f"--- stderr\n{proc.stderr[-3000:]}")
        return proc


def _http_status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture
def machine(tmp_path):
    tmp = Path(tempfile.mkdtemp(prefix="q3r-launch-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    m = Machine(tmp, tmp_path / "commands.log")
    try:
        yield m
    finally:
        _stop_processes_of(m.home, m.tmp / "laptop-home")
        m.log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_cluster_yaml_commands_bring_up_a_token_auth_cluster_that_runs_the_readme_job(machine):
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    laptop = machine.tmp / "laptop-home"
    laptop.mkdir()
    readme = _readme_cluster_commands()

    # On the laptop, as the README says: the token is created once, outside the repository.
    [gen] = [c for c in readme if "get-auth-token --generate" in c]
    machine.laptop(gen, home=laptop)
    token = (laptop / ".ray" / "auth_token").read_text().strip()
    assert token and not list(ROOT.rglob("auth_token"))

    # file_mounts: the repository and the token, at the paths cluster.yaml names.
    assert config["file_mounts"] == {"~/qwen3vl-ray": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    (machine.home / "qwen3vl-ray").symlink_to(ROOT)
    (machine.home / ".ray").mkdir()
    shutil.copy2(laptop / ".ray" / "auth_token", machine.home / ".ray" / "auth_token")
    # The launcher writes the prepared config to the head for its autoscaler.
    from ray.autoscaler._private.util import prepare_config

    (machine.home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(prepare_config(dict(config))))

    for section in ("initialization_commands", "setup_commands", "head_setup_commands", "head_start_ray_commands"):
        for cmd in config[section]:
            if _keep_other_ray() and cmd.strip() == "ray stop":
                continue
            machine.run(cmd)
    assert (machine.home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    assert (machine.nvme / "qwen3vl-ray" / "disk-tier").stat().st_mode & 0o777 == 0o700

    # The second node joins with the token it got through file_mounts.
    from ray.autoscaler._private.util import with_head_node_ip

    for cmd in with_head_node_ip(config["worker_start_ray_commands"], "127.0.0.1"):
        if cmd.endswith("; ray stop"):
            continue  # one machine: it would stop the head as well
        assert "; ray start" in cmd
        # The launcher declares a node type's resources (a g5.2xlarge: its GPU) through RAY_OVERRIDE_RESOURCES.
        own_temp_dir = f" --temp-dir={machine.tmp / 'node2-ray'}"
        machine.run(cmd + _second_node_ports() + own_temp_dir, env_vars={"RAY_OVERRIDE_RESOURCES": {"CPU": 2, "GPU": 2}})
    nodes = json.loads(machine.run(
        "python3 -c \"import json, ray; ray.init(address='auto', logging_level='ERROR'); "
        "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))\"").stdout.strip().splitlines()[-1])
    assert len(nodes) == 2 and sum(n.get("GPU", 0) for n in nodes) == 2

    # The dashboard refuses a request without the token, and takes one with it.
    assert _http_status(f"{DASHBOARD}/api/jobs/") == 401
    assert _http_status(f"{DASHBOARD}/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200

    # The README's job, as written (its output path mapped under the temp dir), from the laptop with the token.
    [submit] = [c for c in readme if c.startswith("RAY_AUTH_MODE=token ray job submit")]
    out = machine.tmp / "out.parquet"
    job = machine.laptop(submit.replace("/tmp/out.parquet", str(out)), home=laptop)
    assert "succeeded" in job.stdout, job.stdout[-2000:]
    table = pq.read_table(out).to_pylist()
    prompts = [json.loads(line) for line in (ROOT / "jobs/data/prompts.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(r["id"] for r in table) == sorted(str(p["id"]) for p in prompts)
    assert all(r["error"] is None and r["completion_tokens"] for r in table)

    # The same submit without the token is refused (and runs nothing).
    stranger = machine.tmp / "stranger-home"
    stranger.mkdir()
    refused = machine.laptop(submit.replace("RAY_AUTH_MODE=token ", "").replace("/tmp/out.parquet", str(out) + ".2"),
                             home=stranger, check=False, timeout=300)
    assert refused.returncode != 0
    assert re.search(r"(?i)auth", refused.stdout + refused.stderr)
    assert not Path(str(out) + ".2").exists()


def _second_node_ports() -> str:
    """Ports of the per-node agents that default to fixed numbers: a second node on the head's machine must not
    take the head's (on the real cluster each node is its own machine)."""
    flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--node-manager-port", "--object-manager-port")
    return "".join(f" {flag}={port}" for flag, port in free_ports(flags).items())


def _stop_processes_of(*homes: Path) -> None:
    """`ray down` runs `ray stop` on every node, which stops every Ray on a machine; here only the processes of
    this cluster go: every one of them (Ray's daemons, the job's driver, the actors) inherited a home of ours."""
    import signal

    wanted = {f"HOME={h}".encode() for h in homes}
    for _ in range(3):
        found = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                environ = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if environ & wanted:
                found = True
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not found:
            return
        time.sleep(1.0)


def _keep_other_ray() -> bool:
    """Developers running this beside other Ray tests on one machine may set QWEN3VL_RAY_TEST_KEEP_OTHER_RAY=1:
    the head's own `ray stop` (which stops every Ray on the machine) is then skipped. CI runs it as written."""
    return os.environ.get("QWEN3VL_RAY_TEST_KEEP_OTHER_RAY") == "1"
