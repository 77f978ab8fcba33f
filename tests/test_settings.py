"""qwen3vl_ray.settings: one table of options -> env vars, flags, configs, and docs/configuration.md."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3vl_ray import settings as S
from qwen3vl_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_docs_are_in_sync_with_the_table():
    # docs/configuration.md is generated; regenerate with: python -m qwen3vl_ray.settings --markdown
    assert (ROOT / "docs" / "configuration.md").read_text().rstrip("\n") == S.markdown().rstrip("\n")


def test_every_option_is_documented_with_env_and_flag():
    doc = S.markdown()
    for o in S.OPTIONS:
        assert o.env.startswith("QWEN3VL_RAY_") and o.env in doc and o.flag in doc
        assert o.help and o.target


@pytest.mark.parametrize("text,expected", [
    ("1048576", 1 << 20), ("64MiB", 64 << 20), ("2GiB", 2 << 30), ("500MB", 500_000_000), ("1.5K", 1536),
    ("4 KiB", 4096), (123, 123),
])
def test_parse_bytes(text, expected):
    assert S.parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "12XB", "-5", "MiB", True])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ConfigError):
        S.parse_bytes(bad)


def test_precedence_explicit_over_env_over_default():
    env = {"QWEN3VL_RAY_HOST_BYTES": "64MiB", "QWEN3VL_RAY_BATCH_SIZE": "3"}
    s = S.resolve({"batch_size": 5}, env=env)
    assert s.batch_size == 5 and s.source("batch_size") == "explicit"
    assert s.host_bytes == 64 << 20 and s.source("host_bytes") == "env"
    assert s.device_bytes == 256 << 20 and s.source("device_bytes") == "default"


def test_unknown_env_var_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="QWEN3VL_RAY_HOST_BYTE\\b"):
        S.resolve(env={"QWEN3VL_RAY_HOST_BYTE": "1"})


def test_bad_value_names_option_flag_and_env():
    with pytest.raises(ConfigError, match=r"dtype.*--dtype.*QWEN3VL_RAY_DTYPE.*float32"):
        S.resolve(env={"QWEN3VL_RAY_DTYPE": "int4"})
    with pytest.raises(ConfigError, match="batch_size must be > 0"):
        S.resolve({"batch_size": 0}, env={})
    with pytest.raises(ConfigError, match="watermarks"):
        S.resolve({"low_watermark": 0.95}, env={})


def test_argparse_flags_round_trip():
    p = argparse.ArgumentParser()
    S.add_arguments(p)
    args = p.parse_args(["--disk-bytes", "0", "--disk-fsync", "no", "--model", "/ckpt"])
    s = S.from_args(args, env={"QWEN3VL_RAY_MODEL": "tiny"})
    assert s.disk_bytes == 0 and s.disk_fsync is False and s.model == "/ckpt"


def test_to_env_reproduces_settings():
    s = S.resolve({"host_bytes": "3MiB", "prefix_cache": False, "model": "/x"}, env={})
    again = S.resolve(env=s.to_env())
    assert dict(again) == dict(s)


def test_tier_configs_follow_settings(tmp_path):
    s = S.resolve({"disk_dir": str(tmp_path), "host_codec": "int8", "disk_bytes": "1MiB"}, env={})
    tiers = S.tier_configs(s)
    assert [t.kind for t in tiers] == ["device", "host", "disk"]
    assert tiers[1].codec == "int8" and tiers[2].path == str(tmp_path) and tiers[2].capacity_bytes == 1 << 20
    assert [t.kind for t in S.tier_configs(s.replace(disk_bytes=0))] == ["device", "host"]


def test_library_has_no_ray_import():
    """Every module of the core package, the vLLM connectors included, imports without Ray (the connectors'
    Ray store is plugged in by name from ``actors``)."""
    code = ("import sys, pkgutil, importlib, qwen3vl_ray\n"
            "for m in pkgutil.walk_packages(qwen3vl_ray.__path__, 'qwen3vl_ray.'):\n"
            "    importlib.import_module(m.name)\n"
            "assert 'ray' not in sys.modules, sorted(k for k in sys.modules if k.split('.')[0] == 'ray')[:5]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_engine_config_follows_settings(tmp_path):
    s = S.resolve({"chunk_tokens": 64, "dtype": "float32", "policy": "lru", "device_bytes": "2MiB",
                   "disk_dir": str(tmp_path), "vision_cache": False, "tenant": "t1"}, env={})
    cfg = S.engine_config(s)
    assert (cfg.chunk_tokens, cfg.dtype, cfg.policy, cfg.vision_cache, cfg.tenant) == (64, "float32", "lru", False, "t1")
    assert [t.kind for t in cfg.tiers] == ["device", "host", "disk"] and cfg.tiers[0].capacity_bytes == 2 << 20
    assert S.resolved_dtype(s.replace(dtype="auto")) in ("float32", "bfloat16")


@pytest.mark.parametrize("dtype,device,on_cuda,expected", [
    ("auto", "cpu", None, "float32"),      # a CPU device never gets bfloat16, whatever this machine has
    ("auto", "auto", True, "bfloat16"),    # a driver building GPU workers' configs on a CPU-only machine
    ("auto", "cuda", False, "float32"),    # where it runs decides, when the caller knows it
    ("float16", "cpu", True, "float16"),   # an explicit dtype is kept
])
def test_one_dtype_rule(dtype, device, on_cuda, expected):
    assert S.concrete_dtype(dtype, device, on_cuda) == expected
    s = S.resolve({"dtype": dtype, "device": device}, env={})
    assert S.resolved_dtype(s, on_cuda) == S.engine_config(s, on_cuda=on_cuda).dtype == expected


def test_resolve_checkpoint_rejects_unknown_model(tmp_path):
    with pytest.raises(ConfigError, match="neither a checkpoint directory nor a preset"):
        S.resolve_checkpoint(S.resolve({"model": "no-such-model", "checkpoint_dir": str(tmp_path)}, env={}))


def test_refuse_unhonoured_names_what_was_set_and_passes_defaults():
    # a path that cannot honour host_codec and disk_dir: each one set is named, with its flag and variable
    s = S.resolve({"host_codec": "int8"}, env={"QWEN3VL_RAY_DISK_DIR": "/elsewhere"})
    with pytest.raises(ConfigError, match=r"^host_codec, disk_dir: the test path cannot honour --host-codec / "
                                          r"QWEN3VL_RAY_HOST_CODEC = 'int8', --disk-dir / QWEN3VL_RAY_DISK_DIR = "
                                          r"'/elsewhere'; unset them$"):
        S.refuse_unhonoured(s, ("host_codec", "disk_dir", "disk_bytes"), "the test path", "unset them")
    # set to the default (a path as the user writes it, ~ and all) it is what the path does anyway: no error
    same = S.resolve({"host_codec": "none", "disk_dir": S.default("disk_dir")}, env={})
    S.refuse_unhonoured(same, ("host_codec", "disk_dir"), "the test path", "unset them")
