"""One config path: every dataclass field an option feeds defaults to the option's default, and the Ray service
honours each option it is given or refuses it by name (issue 10, "one config path")."""

import dataclasses
import os
import re

import pytest

from actors import engine_adapter
from actors.config import OTHER_ENGINE_UNHONOURED, AgentConfig, CoordinatorConfig, ServiceConfig, WorkerConfig
from qwen3vl_ray import settings as S
from qwen3vl_ray.engine.config import EngineConfig
from qwen3vl_ray.engine.requests import SamplingParams
from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.tiers.config import TierConfig

CLASSES = {c.__name__: c for c in (EngineConfig, TierConfig, AgentConfig, CoordinatorConfig, WorkerConfig,
                                   SamplingParams)}
TARGET_RE = re.compile(r"^(?P<cls>\w+)(?:\((?P<kind>\w+)\))?\.(?P<field>\w+)$")

# Where a library default must differ from the option's, and why. Each entry is checked to still differ, so a
# fixed one has to leave this list.
ALLOWED = {
    # concrete on purpose: the dtype is part of every cache key's namespace, and a router computes keys
    # client-side, possibly without the workers' GPU; the builders resolve "auto" (settings.resolved_dtype)
    ("EngineConfig", "dtype"): "float32",
    # a tier has no default directory (a disk tier without one is refused); the builders pass disk_dir
    ("TierConfig", "path"): None,
    # None is the settings' -1 ("1 when the cluster has GPUs, else 0"), which from_settings resolves
    ("WorkerConfig", "num_gpus"): None,
    # a library caller's sampling is unseeded unless asked; the jobs seed 0 so that reruns repeat
    ("SamplingParams", "seed"): None,
}


def _targets():
    """(option, class name, field) for every ``Option.target`` part naming a field of a dataclass above."""
    for o in S.OPTIONS:
        for part in o.target.split(", "):
            m = TARGET_RE.match(part)
            if m and m["cls"] in CLASSES:
                yield o, m["cls"], m["field"]


def _field_default(cls, name):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]  # KeyError: a target naming no field
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@pytest.mark.parametrize("o,cls,name", list(_targets()), ids=lambda v: getattr(v, "name", v))
def test_dataclass_default_is_the_options_default(o, cls, name):
    default = _field_default(CLASSES[cls], name)
    if default is dataclasses.MISSING:
        return  # a required field (a tier's capacity): no library default to disagree
    if (cls, name) in ALLOWED:
        assert default == ALLOWED[cls, name] != o.default, f"{cls}.{name}: update ALLOWED"
    else:
        assert default == o.default, f"{cls}.{name} defaults to {default!r}, option {o.name} to {o.default!r}"


def test_every_config_dataclass_is_reached_by_the_walk():
    # a target renamed away from its class would silently drop the check above
    assert {cls for _, cls, _ in _targets()} == set(CLASSES)


def test_defaults_agree_with_configs_built_from_default_settings():
    s = S.resolve({}, env={})
    built = S.engine_config(s)
    lib = EngineConfig()
    for f in dataclasses.fields(EngineConfig):
        if f.name not in ("dtype", "tiers"):  # dtype: ALLOWED; tiers: below
            assert getattr(lib, f.name) == getattr(built, f.name), f.name
    assert lib.tiers == built.tiers[:2]  # the library's store has no disk tier unless given a directory
    service = ServiceConfig.from_settings(s, resolve_model=False)
    lib_agent = AgentConfig()  # the table keeps "~" for the docs; settings expand it when they resolve
    assert service.agent == dataclasses.replace(lib_agent, disk_dir=os.path.expanduser(lib_agent.disk_dir))
    assert service.coordinator == CoordinatorConfig()
    assert (service.worker.num_cpus, service.worker.max_retries) == (WorkerConfig().num_cpus, WorkerConfig().max_retries)


def test_ray_path_passes_the_device_tier_settings_to_the_engine():
    s = S.resolve({"device_codec": "int8", "block_bytes": "64KiB", "device": "cpu", "device_bytes": "8MiB",
                   "high_watermark": 0.8}, env={})
    args = ServiceConfig.from_settings(s, resolve_model=False).worker.engine_args
    assert args["tiers"] == [TierConfig("device", 8 << 20, codec="int8", device="cpu", block_bytes=64 << 10,
                                        high_watermark=0.8)]
    # the adapter builds its store from these tiers (what remains of engine_args is EngineConfig's)
    config = engine_adapter._engine_config(args["device_tier_bytes"],
                                           **{k: v for k, v in args.items() if k not in engine_adapter._ADAPTER_ONLY})
    assert config.tiers == args["tiers"] and config.device == "cpu"


@pytest.mark.parametrize("name,value", [("device_codec", "int8"), ("block_bytes", "64KiB"), ("device", "cpu")])
def test_ray_path_with_another_engine_refuses_what_it_cannot_honour(name, value):
    synthetic = {"engine": "actors.synthetic_engine:SyntheticKVEngine"}
    assert ServiceConfig.from_settings(S.resolve(synthetic, env={})).worker.engine_args == {}  # defaults: fine
    with pytest.raises(ConfigError, match=rf"^{name}: .*{S.option(name).flag}"):
        ServiceConfig.from_settings(S.resolve({**synthetic, name: value}, env={}))
    env = {"QWEN3VL_RAY_ENGINE": synthetic["engine"], S.option(name).env: value}
    with pytest.raises(ConfigError, match=S.option(name).env):  # the environment too (ray job env, node env)
        ServiceConfig.from_env(env)


def test_another_engine_refusal_names_every_option_set():
    s = S.resolve({"engine": "actors.synthetic_engine:SyntheticKVEngine", "device_codec": "int8",
                   "block_bytes": "64KiB"}, env={})
    with pytest.raises(ConfigError, match=r"^device_codec, block_bytes: "):
        ServiceConfig.from_settings(s)
    # set to the default it is honoured: no error
    same = S.resolve({"engine": "actors.synthetic_engine:SyntheticKVEngine", "device": "auto"}, env={})
    assert ServiceConfig.from_settings(same).worker.device_bytes == S.default("device_bytes")
    assert set(OTHER_ENGINE_UNHONOURED) == {"device_codec", "block_bytes", "device"}
