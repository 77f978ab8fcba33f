"""qwen3vl-ray CLI: commands, help, config reference, bench listing, infer through the CLI."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import cli
from qwen3vl_ray import settings as S

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["qwen3vl-ray"] == "jobs.cli:main"


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "infer", "serve", "status", "make-checkpoint", "bench", "service", "config"):
        assert f"  {name} " in out


def test_unknown_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_config_markdown_is_the_reference(capsys):
    assert cli.main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == S.markdown().rstrip("\n")


def test_bad_env_value_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("QWEN3VL_RAY_BATCH_SIZE", "many")
    rc = cli.main(["infer", "--input", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "o.parquet")])
    assert rc == 2
    assert "QWEN3VL_RAY_BATCH_SIZE" in capsys.readouterr().err


def test_bench_lists_modules_and_rejects_unknown(capsys):
    assert cli.main(["bench"]) == 0
    out = capsys.readouterr().out
    import pkgutil

    import benchmarks

    names = [m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_")]
    runnable = [n for n in names if "def main" in (ROOT / "benchmarks" / f"{n}.py").read_text()]
    assert runnable
    for name in names:  # benchmarks listed, helper modules (no main) not
        assert (f"\n{name} " in out) == (name in runnable), name
    assert cli.main(["bench", "no_such_benchmark"]) == 2


def test_infer_through_the_cli_in_a_subprocess(tmp_path):
    # Only bad rows: the job validates, writes each error, and never needs to load a model.
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "x", "images": ["missing.png"]}) + "\n"
                   + json.dumps({"id": "b", "messages": "not json"}) + "\n")
    out = tmp_path / "out.parquet"
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "infer", "--input", str(src), "--output", str(out),
                        "--fail-on-error", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("summary: "))
    assert summary["errors_total"] == 2 and summary["rows_in_output"] == 2
    errors = dict(zip(*pq.read_table(out, columns=["id", "error"]).to_pydict().values()))
    assert "not found" in errors["a"] and "not JSON" in errors["b"]


@pytest.mark.slow
def test_make_checkpoint_writes_a_loadable_tiny_checkpoint(tmp_path, capsys):
    assert cli.main(["make-checkpoint", "tiny", "--path", str(tmp_path / "tiny")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "tiny")
    assert (tmp_path / "tiny" / "config.json").is_file()
    # idempotent: a second call reuses it
    assert cli.main(["make-checkpoint", "tiny", "--path", str(tmp_path / "tiny")]) == 0


def test_log_level_flag_sets_the_jobs_level_and_hands_the_actor_level_on(tmp_path):
    """--log-level is this process's level; --actor-log-level reaches the actors of an embedded Ray through the
    environment they inherit."""
    import logging
    import os

    from jobs.log_levels import apply_log_levels
    from qwen3vl_ray import settings as S

    root = logging.getLogger()
    old_level, old_env = root.level, os.environ.get("QWEN3VL_RAY_ACTOR_LOG_LEVEL")
    try:
        apply_log_levels(S.resolve({"log_level": "error", "actor_log_level": "debug"}, env={}))
        assert root.level == logging.ERROR and os.environ["QWEN3VL_RAY_ACTOR_LOG_LEVEL"] == "DEBUG"
        apply_log_levels(S.resolve({"log_level": "INFO"}, env={}))
        assert root.level == logging.INFO and os.environ["QWEN3VL_RAY_ACTOR_LOG_LEVEL"] == "INFO"
    finally:
        root.setLevel(old_level)
        if old_env is None:
            os.environ.pop("QWEN3VL_RAY_ACTOR_LOG_LEVEL", None)
        else:
            os.environ["QWEN3VL_RAY_ACTOR_LOG_LEVEL"] = old_env
