"""One-line errors: each way a user commonly gets the command line wrong ends in one ``error: ...`` line on
stderr that names the problem and the fix, exit status 2, and no traceback; ``--fail-on-error`` (exit 1) names
the failed ids and counts the errors per kind.

Every case runs the real command in a subprocess, as a user would. The token-auth cases run against a real
``ray start --head`` with ``RAY_AUTH_MODE=token`` (its token in a temporary ``~/.ray/auth_token``), stopped
with SIGTERM to its process group (never ``ray stop``, which would stop every Ray on the machine).
"""

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import infer
from qwen3vl_ray import settings as S
from qwen3vl_ray.engine.checkpoint import check_checkpoint_dir
from qwen3vl_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLI = str(BIN / "qwen3vl-ray")


def _env(**extra) -> dict:
    """This process's environment without any Ray address, auth mode or qwen3vl-ray setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(S.ENV_PREFIX) and k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                           "RAY_AUTH_TOKEN_PATH")}
    return {**env, **extra}


def _run(args: list[str], env: dict | None = None, timeout: float = 120,
         head_temp: str | None = None) -> subprocess.CompletedProcess:
    """``args`` run to the end; one that runs past ``timeout`` fails with its whole stderr tail (pytest's repr
    of the exception cuts out its middle) and, with ``head_temp``, the tails of that Ray head's logs."""
    try:
        return subprocess.run(args, cwd=ROOT, env=env if env is not None else _env(), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        from tests.ray_head import head_logs

        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        logs = head_logs(head_temp) if head_temp else ""
        raise AssertionError(f"{args[1:]} ran past {timeout} s; its stderr:\n{stderr[-6000:]}\n{logs}") from None


def _assert_one_line_error(r: subprocess.CompletedProcess, status: int, *words: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == status, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("", 0))  # free on every address: Ray's probe goes to the node's own address, not 127.0.0.1
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


# -- settings ----------------------------------------------------------------------------------------------

def test_bad_log_level_is_one_line():
    r = _run([CLI, "status"], env=_env(QWEN3VL_RAY_LOG_LEVEL="verbose"))
    _assert_one_line_error(r, 2, "QWEN3VL_RAY_LOG_LEVEL", "'VERBOSE'", "DEBUG, INFO, WARNING, ERROR")


def test_log_level_is_case_insensitive():
    assert S.resolve({"log_level": "debug", "actor_log_level": "warning"}, env={}).log_level == "DEBUG"
    r = _run([CLI, "config"], env=_env(QWEN3VL_RAY_LOG_LEVEL="info"))
    assert r.returncode == 0, r.stderr


def test_num_workers_zero_is_for_the_service_only(tmp_path):
    assert S.resolve({"num_workers": 0}, env={}).num_workers == 0  # `service --num-workers 0` is allowed
    with pytest.raises(ConfigError, match="num_workers must be >= 0"):
        S.resolve({"num_workers": -1}, env={})
    # a job needs a worker: refused before Ray starts
    r = _run([CLI, "infer", "--input", str(ROOT / "jobs/data/prompts.jsonl"), "--output", str(tmp_path / "o.parquet"),
              "--num-workers", "0", "--no-progress"])
    _assert_one_line_error(r, 2, "num_workers must be > 0 for a job")


# -- checkpoint ----------------------------------------------------------------------------------------------

def test_empty_model_directory_is_one_line_before_ray_starts(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _run([CLI, "infer", "--input", str(ROOT / "jobs/data/prompts.jsonl"), "--output", str(tmp_path / "o.parquet"),
              "--model", str(tmp_path / "empty"), "--no-progress"])
    line = _assert_one_line_error(r, 2, str(tmp_path / "empty"), "no config.json", "--model takes", "tiny")
    assert "Ray" not in r.stdout + line  # no Ray was started (it would say so on stdout or stderr)


def test_checkpoint_directory_checks_name_the_missing_piece(tmp_path):
    # add the pieces one at a time: each check names the next missing one
    d = tmp_path / "ckpt"
    d.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        check_checkpoint_dir(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        check_checkpoint_dir(d)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    with pytest.raises(ConfigError, match=r"no \*.safetensors"):
        check_checkpoint_dir(d)
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="no tokenizer"):
        check_checkpoint_dir(d)
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="no preprocessor_config.json"):
        check_checkpoint_dir(d)
    (d / "preprocessor_config.json").write_text("{}")
    assert check_checkpoint_dir(d) == d
    assert S.resolve_checkpoint(S.resolve({"model": str(d)}, env={})) == str(d.resolve())


# -- cluster ---------------------------------------------------------------------------------------------------

def test_nothing_at_the_address_fails_fast_in_one_line(tmp_path):
    port = _closed_port()
    r = _run([CLI, "status", "--address", f"127.0.0.1:{port}"], timeout=60)
    _assert_one_line_error(r, 2, f"no Ray cluster at 127.0.0.1:{port}", "connection refused", "ray start --head")
    r = _run([CLI, "status", "--address", f"ray://127.0.0.1:{port}"], timeout=60)  # a Ray client address
    _assert_one_line_error(r, 2, f"no Ray client server at ray://127.0.0.1:{port}", "Connection refused")
    # a job: the cluster is checked before its (preset) checkpoint is generated
    r = _run([CLI, "infer", "--input", str(ROOT / "jobs/data/prompts.jsonl"), "--output", str(tmp_path / "o.parquet"),
              "--address", f"127.0.0.1:{port}", "--no-progress"],
             env=_env(QWEN3VL_RAY_CHECKPOINT_DIR=str(tmp_path / "ckpt")), timeout=60)
    _assert_one_line_error(r, 2, f"no Ray cluster at 127.0.0.1:{port}", "connection refused")
    assert not (tmp_path / "ckpt").exists()


def _attach_with(monkeypatch, cluster_up: list[bool], attach_ok: list[bool]) -> list[str]:
    """``jobs.service_runner._init_ray`` against a cluster whose probes answer as ``cluster_up`` says, in turn,
    and whose ``ray.init`` attempts succeed as ``attach_ok`` says; returns the attempts made."""
    import ray

    import actors.service
    from jobs import service_runner
    from qwen3vl_ray.errors import ClusterError

    attempts = []

    def probe(address):
        if not cluster_up.pop(0):
            raise ClusterError(f"no Ray cluster at {address} (connection refused)")

    def attach(address, **kwargs):
        attempts.append(address)
        if not attach_ok.pop(0):
            raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whatever Ray this test process started before
    monkeypatch.setattr(service_runner, "check_cluster", probe)
    monkeypatch.setattr(actors.service, "attach_ray", attach)
    monkeypatch.setattr(service_runner, "ATTACH_RETRY_S", 0)
    service_runner._init_ray(S.resolve({}, env={}), "10.0.0.1:6379")
    return attempts


def test_a_busy_head_is_attached_to_on_a_later_attempt(monkeypatch):
    assert _attach_with(monkeypatch, [True, True], [False, True]) == ["10.0.0.1:6379"] * 2


def test_a_head_that_goes_down_while_attaching_is_one_line_at_once(monkeypatch):
    from qwen3vl_ray.errors import ClusterError

    # the first ray.init fails because the head went down: the probe before the next attempt says so
    with pytest.raises(ClusterError, match=r"^no Ray cluster at 10\.0\.0\.1:6379 \(connection refused\)$"):
        _attach_with(monkeypatch, [True, False], [False, True])


def test_status_with_no_cluster_on_this_machine_is_one_line():
    # `status` defaults to --address auto; other Rays on this (shared) machine are hidden from its look-up
    code = ("import ray._private.services as s; none = lambda: []; none.cache_clear = lambda: None; "
            "s.find_gcs_addresses = none; s.find_bootstrap_address = lambda temp_dir: None; "
            "from jobs.cli import main; raise SystemExit(main(['status']))")
    r = _run([sys.executable, "-c", code], timeout=60)
    _assert_one_line_error(r, 2, "no Ray cluster is running on this machine", "--address auto", "ray start --head")


def test_service_on_an_embedded_ray_is_refused():
    r = _run([CLI, "service", "--num-workers", "0"])
    _assert_one_line_error(r, 2, "`service` needs a running Ray cluster", "--address", "RAY_ADDRESS")


# -- failed rows -------------------------------------------------------------------------------------------------

def test_fail_on_error_names_the_failed_ids_and_kinds(tmp_path):
    # 7 bad rows (5 missing images, 2 malformed chats): no model is needed, each row gets its error
    rows = [{"id": f"img{i}", "prompt": "x", "images": [f"missing{i}.png"]} for i in range(5)]
    rows += [{"id": f"chat{i}", "messages": "not json"} for i in range(2)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.parquet"
    r = _run([CLI, "infer", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--fail-on-error",
              "--no-progress"])
    line = _assert_one_line_error(r, 1, "7 row(s) have errors", "RowError: 7",
                                  "failed ids: img0, img1, img2, img3, img4 and 2 more", str(out), "--fail-on-error")
    assert "chat0" not in line
    summary = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("summary: "))
    assert summary["failed_ids"] == ["img0", "img1", "img2", "img3", "img4"]
    assert summary["error_kinds"] == {"RowError": 7}


def test_error_kinds_are_the_exception_class_names(tmp_path):
    out = tmp_path / "out.parquet"
    errors = [None, "ImageError: corrupt", "CapacityError: too long", "ImageError: too large",
              "preprocessing failed: ValueError: bad chat", "image 'a.png' not found", None]
    ids = [f"r{i}" for i in range(len(errors))]
    pq.write_table(pa.table({"id": ids, "error": errors}), out)
    summary = {"output": str(out), **infer._errors(str(out), set(ids[:-1]))}
    assert summary["errors_total"] == 5
    assert summary["failed_ids"] == ["r1", "r2", "r3", "r4", "r5"]
    # most frequent first, then by name
    assert list(summary["error_kinds"].items()) == [("ImageError", 2), ("CapacityError", 1), ("RowError", 1),
                                                     ("ValueError", 1)]
    assert infer.failed_rows_text(summary).startswith(
        "5 row(s) have errors (ImageError: 2, CapacityError: 1, RowError: 1, ValueError: 1); "
        "failed ids: r1, r2, r3, r4, r5 (the error column of")


# -- a token-auth cluster ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A ``ray start --head`` with token auth on, its token in ``<home>/.ray/auth_token``."""
    from tests.ray_head import running_head

    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    token = secrets.token_hex(32)
    (home / ".ray" / "auth_token").write_text(token)
    env = _env(HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=str(ROOT))  # the service's actors import this checkout
    with running_head(env, wait_dashboard=False) as (ports, temp):
        yield {"gcs": f"127.0.0.1:{ports['gcs']}", "env": env, "home": home, "token": token, "temp": temp}


@pytest.mark.ray
@pytest.mark.slow
def test_token_cluster_without_the_token_is_one_line(token_head, tmp_path):
    gcs = token_head["gcs"]
    # no auth mode, no token (an empty home): the probe says so at once, instead of Ray's 20 s wait + traceback
    r = _run([CLI, "status", "--address", gcs], env=_env(HOME=str(tmp_path)), timeout=60)
    _assert_one_line_error(r, 2, f"the Ray cluster at {gcs} requires token authentication",
                           "RAY_AUTH_MODE=token", "~/.ray/auth_token", "RAY_AUTH_TOKEN")
    # the job's own attach (engine runner: for its metrics) says the same
    r = _run([CLI, "infer", "--input", str(ROOT / "jobs/data/prompts.jsonl"), "--output", str(tmp_path / "o.parquet"),
              "--runner", "engine", "--address", gcs, "--no-progress"], env=_env(HOME=str(tmp_path)), timeout=60)
    _assert_one_line_error(r, 2, "requires token authentication", "RAY_AUTH_MODE=token")
    # the mode without a token, and a wrong token
    r = _run([CLI, "status", "--address", gcs], env=_env(HOME=str(tmp_path), RAY_AUTH_MODE="token"), timeout=60)
    _assert_one_line_error(r, 2, "RAY_AUTH_MODE=token but no token is set", "~/.ray/auth_token")
    r = _run([CLI, "status", "--address", gcs],
             env=_env(HOME=str(tmp_path), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64), timeout=60)
    _assert_one_line_error(r, 2, f"the Ray cluster at {gcs} rejected this process's token")


@pytest.mark.ray
@pytest.mark.slow
def test_service_with_zero_workers_then_status_with_the_token(token_head, tmp_path):
    gcs = token_head["gcs"]
    # the fix the errors name: RAY_AUTH_MODE=token with the token in ~/.ray/auth_token; no model is needed
    # for a service without workers
    env = _env(HOME=str(token_head["home"]), RAY_AUTH_MODE="token", QWEN3VL_RAY_DISK_DIR=str(tmp_path / "disk"),
               QWEN3VL_RAY_ENGINE="actors.synthetic_engine:SyntheticKVEngine")
    temp = token_head["temp"]  # its logs are in a hang's report
    r = _run([CLI, "status", "--address", gcs], env=env, timeout=120, head_temp=temp)  # nothing started there yet
    _assert_one_line_error(r, 2, f"no qwen3vl-ray coordinator on the Ray cluster at {gcs}", "qwen3vl-ray service")
    # the head's own start command: coordinator and node agents, no workers
    r = _run([CLI, "service", "--address", gcs, "--num-workers", "0"], env=env, timeout=300, head_temp=temp)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads(r.stdout)["nodes"]
    r = _run([CLI, "status", "--address", gcs], env=env, timeout=120, head_temp=temp)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "1 node(s)" in r.stdout and "Traceback" not in r.stderr
