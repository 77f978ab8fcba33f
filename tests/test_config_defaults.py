"""One config path: every dataclass field an option feeds defaults to the option's default, and the Ray service
honours each option it is given or refuses it by name (issue 10, "one config path")."""

import dataclasses
import os
import re

import pytest

from actors import engine_adapter
from actors.config import OTHER_ENGINE_UNHONOURED, AgentConfig, CoordinatorConfig, ServiceConfig, WorkerConfig
from qwen3vl_ray import settings as S
from qwen3vl_ray.cache.config import CacheConfig
from qwen3vl_ray.engine.config import EngineConfig
from qwen3vl_ray.engine.requests import SamplingParams
from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.keys import Namespace
from qwen3vl_ray.tiers.config import TierConfig

CLASSES = {c.__name__: c for c in (EngineConfig, TierConfig, AgentConfig, CoordinatorConfig, WorkerConfig,
                                   SamplingParams)}
NS = Namespace(model="m", dtype="float32", layout="test", tenant="default")
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


def _adapter_config(engine_args):
    """The EngineConfig a worker's adapter builds from ``engine_args`` (what remains after its own arguments)."""
    args = dict(engine_args)
    device_tier_bytes = args.pop("device_tier_bytes", engine_adapter.DEVICE_TIER_BYTES)
    return engine_adapter._engine_config(device_tier_bytes,
                                         **{k: v for k, v in args.items() if k not in engine_adapter._ADAPTER_ONLY})


def test_every_config_built_from_default_settings_equals_its_own_defaults():
    s = S.resolve({}, env={})
    # the in-process engine: equal but for the disk tier, which the library adds only when given a directory;
    # dtype "auto" resolved for a CPU engine is the library's float32 (ALLOWED: concrete on purpose)
    built = S.engine_config(s, on_cuda=False)
    assert [t.kind for t in built.tiers] == ["device", "host", "disk"]
    assert dataclasses.replace(built, tiers=built.tiers[:2]) == EngineConfig()
    # the service: agents, coordinator and workers built from default settings are the dataclasses' defaults
    service = ServiceConfig.from_settings(s, gpus_available=False, resolve_model=False)
    assert service.agent == AgentConfig()
    assert service.coordinator == CoordinatorConfig()
    # a worker's num_gpus is resolved against the cluster (None: "1 if it has GPUs"), its engine_args spelled out
    assert service.worker == dataclasses.replace(WorkerConfig(), num_gpus=0.0, engine_args=service.worker.engine_args)
    # ... and those engine_args make the same engine config as WorkerConfig()'s empty ones (the adapter's defaults)
    assert _adapter_config(service.worker.engine_args) == _adapter_config(WorkerConfig().engine_args)
    # the engine's store takes the settings' policy when its CacheConfig names none
    assert CacheConfig(tiers=built.tiers[:1], namespace=NS).policy == built.policy == s.policy


def test_gpu_workers_get_the_gpu_dtype_from_a_cpu_driver():
    # dtype "auto" resolves for where the engine runs: a driver without a GPU building GPU workers
    s = S.resolve({}, env={})
    args = ServiceConfig.from_settings(s, gpus_available=True, resolve_model=False).worker.engine_args
    assert args["dtype"] == "bfloat16"
    assert ServiceConfig.from_settings(s.replace(device="cpu"), gpus_available=False,
                                       resolve_model=False).worker.engine_args["dtype"] == "float32"


def test_ray_path_refuses_a_device_tier_above_the_kv_budget_by_name():
    # the in-process engine refused it; the Ray path used to raise the budget silently to fit the tier
    s = S.resolve({"device_bytes": "64MiB", "kv_device_budget_bytes": "32MiB"}, env={})
    with pytest.raises(ConfigError, match="kv_device_budget_bytes"):
        S.engine_config(s)
    with pytest.raises(ConfigError, match="kv_device_budget_bytes"):
        ServiceConfig.from_settings(s, resolve_model=False)
    # within the budget, the worker's engine gets the budget as set
    args = ServiceConfig.from_settings(s.replace(kv_device_budget_bytes="64MiB"), resolve_model=False).worker.engine_args
    assert _adapter_config(args).kv_device_budget_bytes == 64 << 20


def test_agent_disk_dir_is_expanded_once():
    assert AgentConfig().disk_dir == os.path.expanduser(S.default("disk_dir")) and "~" not in AgentConfig().disk_dir
    assert AgentConfig(disk_dir="/data/tiers").disk_dir == "/data/tiers"


def test_ray_path_passes_the_device_tier_settings_to_the_engine():
    s = S.resolve({"device_codec": "int8", "block_bytes": "64KiB", "device": "cpu", "device_bytes": "8MiB",
                   "high_watermark": 0.8}, env={})
    args = ServiceConfig.from_settings(s, resolve_model=False).worker.engine_args
    assert args["tiers"] == [TierConfig("device", 8 << 20, codec="int8", device="cpu", block_bytes=64 << 10,
                                        high_watermark=0.8)]
    # the adapter builds its store from these tiers (what remains of engine_args is EngineConfig's)
    config = _adapter_config(args)
    assert config.tiers == args["tiers"] and config.device == "cpu"


# a value other than the default for each option another engine cannot honour
NOT_DEFAULT = {"model": "/ckpt", "checkpoint_dir": "/elsewhere", "device": "cpu", "fingerprint": "sampled",
               "dtype": "float16", "device_codec": "int8", "block_bytes": "64KiB", "prefix_cache": "0",
               "vision_cache": "0", "chunk_tokens": "64", "kv_device_budget_bytes": "2GiB", "attn_implementation": "eager",
               "session_idle_s": "5", "max_pixels": "4096"}
SYNTHETIC = {"engine": "actors.synthetic_engine:SyntheticKVEngine"}


@pytest.mark.parametrize("name", OTHER_ENGINE_UNHONOURED)
def test_ray_path_with_another_engine_refuses_what_it_cannot_honour(name):
    value = NOT_DEFAULT[name]
    assert ServiceConfig.from_settings(S.resolve(SYNTHETIC, env={})).worker.engine_args == {}  # defaults: fine
    with pytest.raises(ConfigError, match=rf"^{name}: .*{S.option(name).flag}"):
        ServiceConfig.from_settings(S.resolve({**SYNTHETIC, name: value}, env={}))
    env = {"QWEN3VL_RAY_ENGINE": SYNTHETIC["engine"], S.option(name).env: value}
    with pytest.raises(ConfigError, match=S.option(name).env):  # the environment too (ray job env, node env)
        ServiceConfig.from_env(env)


def test_another_engine_refusal_names_every_option_set():
    s = S.resolve({**SYNTHETIC, "device_codec": "int8", "block_bytes": "64KiB"}, env={})
    with pytest.raises(ConfigError, match=r"^device_codec, block_bytes: "):
        ServiceConfig.from_settings(s)
    # set to the default it is honoured: no error
    same = S.resolve({**SYNTHETIC, "device": "auto", "checkpoint_dir": S.default("checkpoint_dir")}, env={})
    assert ServiceConfig.from_settings(same).worker.device_bytes == S.default("device_bytes")


def test_every_engine_only_option_is_honoured_or_refused_with_another_engine():
    # an option whose every target is the Qwen3-VL engine, its checkpoint or its device tier reaches no other
    # engine: a new one added to the table must join OTHER_ENGINE_UNHONOURED (or be wired for other engines)
    engine_only = re.compile(r"^(EngineConfig\.|TierConfig\(device\)\.|TierConfig\.|Qwen3VLEngine\(|make_checkpoint\()")
    only = {o.name for o in S.OPTIONS if all(engine_only.match(p) for p in o.target.split(", "))}
    assert only - {"tenant"} == set(OTHER_ENGINE_UNHONOURED)  # the tenant: each tenant its own actors
    assert set(NOT_DEFAULT) == set(OTHER_ENGINE_UNHONOURED)


def test_the_storage_side_alone_equals_the_whole_services_and_takes_no_engine_options():
    """vLLM's KV connector on the node agents starts the storage side only (``actors.kv_block_store``): the same
    agents, coordinator and tenant as the whole service's, and no refusal of the workers' engine options it never
    uses (a device tier above the KV budget)."""
    from actors.config import ServiceConfig

    s = S.resolve({"host_bytes": "3GiB", "disk_dir": "/mnt/nvme/kv"})
    whole, storage = ServiceConfig.from_settings(s, resolve_model=False), ServiceConfig.storage_from_settings(s)
    assert (storage.agent, storage.coordinator, storage.tenant) == (whole.agent, whole.coordinator, whole.tenant)
    engine_only = S.resolve({"device_bytes": "4GiB", "kv_device_budget_bytes": "1GiB"})
    with pytest.raises(ConfigError, match="kv_device_budget_bytes"):
        ServiceConfig.from_settings(engine_only, resolve_model=False)
    assert ServiceConfig.storage_from_settings(engine_only).agent == ServiceConfig().agent
