"""One table of every user-facing option: default, unit, environment variable and CLI flag.

The CLI (``qwen3vl-ray ...``), the Ray jobs (``python -m jobs.infer``) and the library read options
through this table, so an option has exactly one name, one default and one environment variable
(``QWEN3VL_RAY_<NAME>``) everywhere. Each option names the dataclass field it feeds (``target``), and that
field's default is read from here (``default``), so a config built without settings and one built from default
settings agree. The ``*_config`` builders below are the only place where settings become the core's configs;
``actors.config.ServiceConfig.from_settings`` builds the Ray service's on top of them (a worker's engine gets
``engine_config``'s fields).

Precedence, highest first: an explicit value (a CLI flag or a keyword), the environment, the default.
``docs/configuration.md`` is generated from this table (``python -m qwen3vl_ray.settings --markdown``)
and a test keeps the two in sync.

No Ray import here: the core library stays usable without Ray.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.policies import DEFAULT_POLICY, POLICIES

ENV_PREFIX = "QWEN3VL_RAY_"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "B": 1,
    "K": 1 << 10, "KI": 1 << 10, "KIB": 1 << 10, "KB": 10**3,
    "M": 1 << 20, "MI": 1 << 20, "MIB": 1 << 20, "MB": 10**6,
    "G": 1 << 30, "GI": 1 << 30, "GIB": 1 << 30, "GB": 10**9,
    "T": 1 << 40, "TI": 1 << 40, "TIB": 1 << 40, "TB": 10**12,
}


def parse_bytes(text: str | int) -> int:
    """``"64MiB"`` -> 67108864. Accepts a plain integer, or a number with B/KiB/MiB/GiB/TiB (binary) or
    KB/MB/GB/TB (decimal); ``K``/``M``/``G``/``T`` alone mean binary units."""
    if isinstance(text, bool):
        raise ConfigError(f"not a byte size: {text!r}")
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"not a byte size: {text!r}; use e.g. 1048576, 64MiB, 2GiB, 500MB")
    unit = (m.group(2) or "").upper()
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def format_bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"not a boolean: {text!r}; use 1/0, true/false, yes/no, on/off")


def _parse_int(text: str | int) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"not an integer: {text!r}") from None


def _parse_float(text: str | float) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"not a number: {text!r}") from None


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "bytes": parse_bytes,
    "int": _parse_int,
    "float": _parse_float,
    "bool": _parse_bool,
    "str": str,
    "path": lambda v: os.path.expanduser(str(v)),
    "level": lambda v: str(v).strip().upper(),  # a logging level name: "debug" is DEBUG
}


@dataclass(frozen=True)
class Option:
    """One option. ``name`` gives the env var (``QWEN3VL_RAY_NAME``) and the flag (``--name-with-dashes``).

    Attributes:
        name: snake_case name, unique.
        section: group in the docs and in ``--help`` (model, tiers, cache, engine, service, jobs).
        kind: value type: bytes (accepts ``64MiB``), int, float, bool, str, path (``~`` expanded), level (a
            logging level name, any case).
        default: value when neither a flag nor the environment sets it (already parsed).
        unit: unit shown in the docs (``bytes``, ``s``, ``tokens``, ...), ``""`` when none.
        help: one sentence; what it does and why one would change it.
        target: the dataclass field it feeds, e.g. ``TierConfig(device).capacity_bytes``.
        choices: allowed values for str options; empty = free text.
    """

    name: str
    section: str
    kind: str
    default: Any
    unit: str
    help: str
    target: str
    choices: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, raw: Any) -> Any:
        value = _PARSERS[self.kind](raw)
        if self.choices and value not in self.choices:
            raise ConfigError(f"{self.name}={value!r} is not allowed; choose one of: {', '.join(self.choices)}")
        return value

    def default_text(self) -> str:
        if self.default is None:
            return "(unset)"
        if self.kind == "bytes":
            return format_bytes(self.default)
        if self.kind == "bool":
            return "1" if self.default else "0"
        return str(self.default)


# Path defaults stay unexpanded here (so the generated docs are the same on every machine); ``resolve``
# expands ``~`` when it applies them.
_CACHE_HOME = "~/.cache/qwen3vl-ray"

OPTIONS: tuple[Option, ...] = (
    # -- model ------------------------------------------------------------------------------------------
    Option("model", "model", "str", "tiny", "",
           "Checkpoint directory, or a preset name (tiny, bench-2b) generated on first use into checkpoint_dir.",
           "Qwen3VLEngine(checkpoint)"),
    Option("checkpoint_dir", "model", "path", os.path.join(_CACHE_HOME, "checkpoints"), "",
           "Where preset checkpoints are generated and reused.", "make_checkpoint(path)"),
    Option("device", "model", "str", "auto", "",
           "Model and device-tier placement: auto (CUDA if present, else CPU), cpu, cuda, cuda:N.",
           "TierConfig(device).device, EngineConfig.device"),
    Option("fingerprint", "model", "str", "full", "",
           "How the model is identified in cache keys: full (hash every weight byte, once per checkpoint "
           "version and machine) or sampled (~4 MiB per weight file; a fine-tune differing only between "
           "samples would share entries).", "EngineConfig.fingerprint", ("full", "sampled")),
    Option("dtype", "model", "str", "auto", "",
           "Model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.",
           "EngineConfig.dtype", ("auto", "float32", "bfloat16", "float16")),
    # -- tiers ------------------------------------------------------------------------------------------
    Option("device_bytes", "tiers", "bytes", 256 << 20, "bytes",
           "Device-tier budget per worker (accelerator memory for cached KV and vision features).",
           "TierConfig(device).capacity_bytes, WorkerConfig.device_bytes"),
    Option("host_bytes", "tiers", "bytes", 1 << 30, "bytes",
           "Host-tier budget per node (the Ray object store in the Ray layer; process memory without Ray).",
           "TierConfig(host).capacity_bytes, AgentConfig.host_bytes"),
    Option("disk_bytes", "tiers", "bytes", 8 << 30, "bytes",
           "Disk-tier budget per node; 0 disables the disk tier.",
           "TierConfig(disk).capacity_bytes, AgentConfig.disk_bytes"),
    Option("disk_dir", "tiers", "path", os.path.join(_CACHE_HOME, "disk-tier"), "",
           "Disk-tier directory (local NVMe in production; created 0700; keep it apart from Ray's spill dir). "
           "Node agents keep their tier in <disk_dir>/machine-<machine tag>-<slot>, stable across Ray sessions on "
           "the same machine and disk; unheld directories of other machines, slots or namespaces are trimmed to "
           "the disk budget, oldest first.",
           "TierConfig(disk).path, AgentConfig.disk_dir"),
    Option("device_codec", "tiers", "str", "none", "",
           "Codec of the device tier. On Ray: each worker's device tier with the qwen3vl engine; another "
           "--engine keeps a plain device tier, so setting it there is an error.", "TierConfig(device).codec"),
    Option("host_codec", "tiers", "str", "none", "",
           "Codec of the host tier (e.g. int8, int8+zstd).",
           "TierConfig(host).codec, AgentConfig.host_codec"),
    Option("disk_codec", "tiers", "str", "none", "",
           "Codec of the disk tier (e.g. zstd, int8+zstd).",
           "TierConfig(disk).codec, AgentConfig.disk_codec"),
    Option("block_bytes", "tiers", "bytes", 1 << 20, "bytes",
           "Pool block size of the device and host tiers; entries take whole blocks. On Ray it sizes each "
           "worker's device-tier blocks with the qwen3vl engine (the host tier is Ray's object store); another "
           "--engine keeps a plain device tier, so setting it there is an error.",
           "TierConfig.block_bytes"),
    Option("disk_fsync", "tiers", "bool", True, "",
           "fsync each disk-tier file and its directory on store (crash safety).",
           "TierConfig(disk).fsync, AgentConfig.disk_fsync"),
    Option("high_watermark", "tiers", "float", 0.9, "fraction",
           "Tier usage above which pressure is reported and relief starts.",
           "TierConfig.high_watermark, AgentConfig.high_watermark"),
    Option("low_watermark", "tiers", "float", 0.75, "fraction",
           "Tier usage that pressure relief drains down to.",
           "TierConfig.low_watermark, AgentConfig.low_watermark"),
    Option("idle_ttl_s", "tiers", "float", 0.0, "s",
           "Node agents drop host- and disk-tier entries neither read nor written for this long (checked on each "
           "coordinator pass, every period_s; the directory forgets them too); 0 keeps them until evicted.",
           "AgentConfig.idle_ttl_s"),
    # -- cache ------------------------------------------------------------------------------------------
    Option("policy", "cache", "str", DEFAULT_POLICY, "",
           "Eviction policy of the engine's store and the node agents (the default is the project's measured "
           "best on prefix-shaped reuse).", "EngineConfig.policy, AgentConfig.policy", tuple(sorted(POLICIES))),
    Option("tenant", "cache", "str", "default", "",
           "Tenant in the key namespace: tenants sharing a cluster never share entries. On Ray each tenant gets its "
           "own coordinator, node agents (own budgets and disk directory) and workers.", "EngineConfig.tenant"),
    Option("tenant_key", "cache", "str", "", "",
           "The tenant's secret (16+ characters; required for any tenant but default): every call into the "
           "tenant's actors must carry it, so other jobs on the cluster cannot use them. Set it in the "
           "environment, not as a flag (flags show in process lists); never printed.", "actors.tenancy.Tenant.key"),
    Option("prefix_cache", "cache", "bool", True, "",
           "Reuse and store prompt KV chunks.", "EngineConfig.prefix_cache"),
    Option("vision_cache", "cache", "bool", True, "",
           "Reuse and store image embeddings and DeepStack features (a hit skips the vision encoder).",
           "EngineConfig.vision_cache"),
    # -- engine -----------------------------------------------------------------------------------------
    Option("chunk_tokens", "engine", "int", 256, "tokens",
           "Prefix-KV chunk size; a prefix is reused in whole chunks.",
           "EngineConfig.chunk_tokens"),
    Option("kv_device_budget_bytes", "engine", "bytes", 1 << 30, "bytes",
           "Accelerator memory for KV per worker: device tier plus the running request's live KV. "
           "A request that cannot fit gets an error, not an out-of-memory crash.",
           "EngineConfig.kv_device_budget_bytes"),
    Option("attn_implementation", "engine", "str", "sdpa", "",
           "transformers attention backend (fused: the attention-score matrix is never materialised).",
           "EngineConfig.attn_implementation", ("sdpa", "flash_attention_2", "flash_attention_3", "eager")),
    Option("session_idle_s", "engine", "float", 30.0, "s",
           "A chat session idle this long is the first swapped down the tiers under device pressure.",
           "EngineConfig.session_idle_s"),
    Option("max_pixels", "engine", "int", 1024 * 1024, "pixels",
           "Largest image accepted (width x height); larger images are rejected per row, not resized.",
           "EngineConfig.max_pixels"),
    Option("max_image_bytes", "engine", "bytes", 32 << 20, "bytes",
           "Largest image file accepted; larger files are rejected per row before decoding.",
           "jobs.dataset.Limits"),
    Option("max_new_tokens", "engine", "int", 32, "tokens",
           "Tokens generated per request.", "SamplingParams.max_new_tokens"),
    Option("temperature", "engine", "float", 0.0, "",
           "Sampling temperature; 0 = greedy.", "SamplingParams.temperature"),
    Option("seed", "engine", "int", 0, "",
           "Sampling seed (used when temperature > 0).", "SamplingParams.seed"),
    # -- service ----------------------------------------------------------------------------------------
    Option("engine", "service", "str", "qwen3vl", "",
           "What the Ray workers run: qwen3vl (the real Qwen3VLEngine, through actors.engine_adapter) or the "
           "module:callable of another engine (e.g. actors.synthetic_engine:SyntheticKVEngine, no model).",
           "WorkerConfig.engine"),
    Option("num_workers", "service", "int", 1, "workers",
           "Qwen3-VL worker actors to run (one per GPU; CPU workers on a CPU-only cluster).",
           "ensure_service(num_workers)"),
    Option("worker_gpus", "service", "float", -1.0, "GPUs",
           "GPUs per worker; -1 = 1 when the cluster has GPUs, else 0.", "WorkerConfig.num_gpus"),
    Option("worker_cpus", "service", "float", 0.5, "CPUs",
           "CPUs reserved per worker.", "WorkerConfig.num_cpus"),
    Option("worker_start_timeout_s", "service", "float", 1800.0, "s",
           "How long a job waits for its workers' resources (an autoscaling cluster boots and sets up GPU nodes "
           "for them: minutes); it reports what it is waiting for meanwhile, then gives up with an error.",
           "ensure_service(worker_start_timeout_s)"),
    Option("max_retries", "service", "int", 2, "",
           "How many other workers a failed request is retried on.", "WorkerConfig.max_retries"),
    Option("period_s", "service", "float", 2.0, "s",
           "How often the coordinator reads every agent's pressure and applies global policies (0 = on demand only).",
           "CoordinatorConfig.period_s"),
    Option("admission", "service", "str", "reject", "",
           "When the cluster is saturated: reject new sessions with a clear error, or queue them for a while.",
           "CoordinatorConfig.admission_mode", ("reject", "queue")),
    Option("recompress_codec", "service", "str", "int8", "",
           "Codec cold host entries are re-encoded with before eviction; empty disables.",
           "CoordinatorConfig.recompress_codec"),
    # -- jobs -------------------------------------------------------------------------------------------
    Option("batch_size", "jobs", "int", 8, "rows",
           "Rows per engine call and per durable output part.", "jobs.infer"),
    Option("address", "jobs", "str", "", "",
           "Ray cluster to attach to (ray://host:10001, host:6379 or auto); empty = RAY_ADDRESS if set "
           "(as inside `ray job submit`), else an embedded Ray.", "ray.init(address)"),
    Option("actor_log_level", "service", "level", "INFO", "",
           "Log level of the service's actors (coordinator, agents, workers). An embedded Ray's actors take it "
           "from the command; a cluster's read it from their nodes' environment (cluster.yaml's "
           "~/.qwen3vl-ray.env).", "logging", ("DEBUG", "INFO", "WARNING", "ERROR")),
    Option("log_level", "jobs", "level", "WARNING", "",
           "Log level of the CLI and the jobs.", "logging", ("DEBUG", "INFO", "WARNING", "ERROR")),
    Option("metrics_export_port", "jobs", "int", 0, "port",
           "Prometheus port of an embedded Ray (0 = Ray's choice). Ignored when attaching to a cluster.",
           "ray.init(_metrics_export_port)"),
)

_BY_NAME = {o.name: o for o in OPTIONS}
assert len(_BY_NAME) == len(OPTIONS), "duplicate option names"
SECTIONS = tuple(dict.fromkeys(o.section for o in OPTIONS))


def option(name: str) -> Option:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown option {name!r}; known: {', '.join(sorted(_BY_NAME))}") from None


def default(name: str) -> Any:
    """The table's default of one option, for the dataclass field it feeds (``Option.target``): each default is
    written once, here, and the configs built without settings (``EngineConfig()``, ``AgentConfig()``, ...)
    agree with those built from them. A path stays unexpanded (``~``), as in the docs."""
    return option(name).default


class Settings(Mapping[str, Any]):
    """Resolved option values (read-only). ``settings.device_bytes`` or ``settings["device_bytes"]``."""

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]):
        self._values = dict(values)
        self._sources = dict(sources)

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def source(self, name: str) -> str:
        """Where a value came from: ``"explicit"``, ``"env"`` or ``"default"``."""
        return self._sources[name]

    def replace(self, **overrides: Any) -> "Settings":
        return resolve(overrides, env={}, base=self)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in another process (e.g. a Ray worker)."""
        out = {}
        for o in OPTIONS:
            v = self._values[o.name]
            out[o.env] = ("1" if v else "0") if o.kind == "bool" else str(v)
        return out

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"


def resolve(overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
            base: Settings | None = None) -> Settings:
    """Resolve every option: ``overrides`` (None values are ignored) > ``env`` > ``base`` or the default.

    Raises ``ConfigError`` naming the option, the bad value and what is allowed.
    """
    env = os.environ if env is None else env
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(_BY_NAME))}")
    stray = sorted(k for k in env if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() not in _BY_NAME)
    if stray:
        raise ConfigError(f"unknown environment variable(s) {', '.join(stray)}; "
                          f"see docs/configuration.md for the {ENV_PREFIX}* variables")
    values, sources = {}, {}
    for o in OPTIONS:
        try:
            if o.name in overrides:
                values[o.name], sources[o.name] = o.parse(overrides[o.name]), "explicit"
            elif o.env in env:
                values[o.name], sources[o.name] = o.parse(env[o.env]), "env"
            elif base is not None:
                values[o.name], sources[o.name] = base[o.name], base.source(o.name)
            else:
                values[o.name], sources[o.name] = o.parse(o.default), "default"
        except ConfigError as e:
            raise ConfigError(f"option {o.name} ({o.flag} / {o.env}): {e}") from None
    _check(values)
    return Settings(values, sources)


def env_value(name: str, env: Mapping[str, str] | None = None) -> Any:
    """One option from the environment (else its default), parsed and checked like ``resolve`` does: for what
    is needed before the rest resolves, such as the CLI's log level."""
    o = option(name)
    env = os.environ if env is None else env
    try:
        return o.parse(env[o.env] if o.env in env else o.default)
    except ConfigError as e:
        raise ConfigError(f"option {o.name} ({o.flag} / {o.env}): {e}") from None


def _check(v: Mapping[str, Any]) -> None:
    for name in ("device_bytes", "host_bytes", "block_bytes", "chunk_tokens", "max_pixels", "max_image_bytes",
                 "max_new_tokens", "batch_size"):
        if v[name] <= 0:
            raise ConfigError(f"{name} must be > 0, got {v[name]}")
    # 0 is for `qwen3vl-ray service` (coordinator and node agents; jobs add their workers): a job checks > 0
    if v["num_workers"] < 0:
        raise ConfigError(f"num_workers must be >= 0, got {v['num_workers']}")
    if v["disk_bytes"] < 0:
        raise ConfigError(f"disk_bytes must be >= 0 (0 disables the disk tier), got {v['disk_bytes']}")
    if not (0.0 < v["low_watermark"] <= v["high_watermark"] <= 1.0):
        raise ConfigError(f"watermarks must satisfy 0 < low <= high <= 1, got low={v['low_watermark']} "
                          f"high={v['high_watermark']}")
    if v["temperature"] < 0:
        raise ConfigError(f"temperature must be >= 0, got {v['temperature']}")
    if v["period_s"] < 0:
        raise ConfigError(f"period_s must be >= 0, got {v['period_s']}")
    if v["idle_ttl_s"] < 0:
        raise ConfigError(f"idle_ttl_s must be >= 0 (0: never expire), got {v['idle_ttl_s']}")


def refuse_unhonoured(s: Settings, names: Iterable[str], by: str, fix: str) -> None:
    """``ConfigError`` naming each of ``names`` set (a flag, a keyword or the environment) to other than its
    default, for a path that cannot honour them: running with another value than the one asked for, silently, is
    worse than refusing. ``by`` says what cannot honour them, ``fix`` what to do instead."""
    bad = [n for n in names if s.source(n) != "default" and s[n] != option(n).parse(option(n).default)]
    if bad:
        flags = ", ".join(f"{option(n).flag} / {option(n).env} = {s[n]!r}" for n in bad)
        raise ConfigError(f"{', '.join(bad)}: {by} cannot honour {flags}; {fix}")


# -- argparse --------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, sections: Iterable[str] = SECTIONS,
                  skip: Iterable[str] = ()) -> None:
    """Add one flag per option of ``sections``. Flags default to None so that ``from_args`` can tell an
    explicit flag from the environment and the default."""
    skip = set(skip)
    for section in sections:
        group = parser.add_argument_group(f"{section} options")
        for o in OPTIONS:
            if o.section != section or o.name in skip:
                continue
            text = f"{o.help} [default {o.default_text()}{' ' + o.unit if o.unit and o.unit != 'bytes' else ''}; env {o.env}]"
            group.add_argument(o.flag, dest=o.name, default=None, metavar=o.kind.upper(), help=text)


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed flags (those set explicitly) over the environment over the defaults."""
    explicit = {o.name: getattr(args, o.name) for o in OPTIONS if getattr(args, o.name, None) is not None}
    return resolve(explicit, env)


# -- builders: settings -> subsystem configs -------------------------------------------------------------

def tier_configs(s: Settings) -> list:
    """Device, host and (if disk_bytes > 0) disk ``TierConfig``s, top to bottom: one process's whole store (the
    engine runner's). On Ray the store is split: a worker's engine keeps ``device_tier_config`` and the node agents
    the host and disk tiers (``AgentConfig``, their disk tier in a per-machine home under ``disk_dir``)."""
    from qwen3vl_ray.tiers.config import TierConfig

    common = _tier_common(s)
    tiers = [device_tier_config(s), TierConfig("host", s.host_bytes, codec=s.host_codec, **common)]
    if s.disk_bytes > 0:
        tiers.append(TierConfig("disk", s.disk_bytes, codec=s.disk_codec, path=s.disk_dir, fsync=s.disk_fsync,
                                **common))
    return tiers


def device_tier_config(s: Settings):
    """The device ``TierConfig``: the top of ``tier_configs``, and on Ray a worker's whole engine store."""
    from qwen3vl_ray.tiers.config import TierConfig

    return TierConfig("device", s.device_bytes, codec=s.device_codec, device=s.device, **_tier_common(s))


def _tier_common(s: Settings) -> dict:
    return dict(block_bytes=s.block_bytes, high_watermark=s.high_watermark, low_watermark=s.low_watermark)


def sampling_kwargs(s: Settings) -> dict:
    """Sampling parameters of a request (greedy when temperature is 0)."""
    return {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "seed": s.seed}


def is_preset(model: str) -> bool:
    """True if ``model`` names a generated-checkpoint preset rather than a directory."""
    from qwen3vl_ray.engine.presets import PRESETS

    return model in PRESETS and not os.path.sep in model


def resolve_checkpoint(s: Settings) -> str:
    """The checkpoint directory for ``s.model``: a preset is generated on first use into
    ``<checkpoint_dir>/<preset>`` (atomic and idempotent, so concurrent workers agree); anything else must
    be an existing directory holding a checkpoint the loader accepts (ConfigError naming what is missing)."""
    model = s.model
    if os.path.isdir(model):
        from qwen3vl_ray.engine.checkpoint import check_checkpoint_dir

        return os.path.abspath(check_checkpoint_dir(model))
    if is_preset(model):
        from qwen3vl_ray.engine.checkpoint import make_checkpoint

        return str(make_checkpoint(model, os.path.join(s.checkpoint_dir, model)))
    from qwen3vl_ray.engine.presets import PRESETS

    raise ConfigError(f"model {model!r} is neither a checkpoint directory nor a preset "
                      f"({', '.join(sorted(PRESETS))})")


def resolved_device(s: Settings) -> str:
    return concrete_device(s.device)


def concrete_device(device: str) -> str:
    """``device`` with auto resolved for this process: CUDA if present, else CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolved_dtype(s: Settings, on_cuda: bool | None = None) -> str:
    return concrete_dtype(s.dtype, s.device, on_cuda)


def concrete_dtype(dtype: str, device: str = "auto", on_cuda: bool | None = None) -> str:
    """``dtype`` with auto resolved: bfloat16 on CUDA, else float32. ``on_cuda`` says whether the model runs on
    CUDA where that is not this process's device (a Ray driver building its workers' configs); None asks
    ``concrete_device(device)``. The one rule for every caller (settings, the Ray workers' engine arguments)."""
    if dtype != "auto":
        return dtype
    if on_cuda is None:
        on_cuda = concrete_device(device).startswith("cuda")
    return "bfloat16" if on_cuda else "float32"


def engine_config(s: Settings, tiers: list | None = None, on_cuda: bool | None = None):
    """The ``EngineConfig`` for these settings: the one builder, for the in-process engine and (through
    ``actors.config.ServiceConfig.from_settings``) the Ray workers' engines alike. ``tiers`` overrides the tier
    list (a Ray worker's engine keeps only ``device_tier_config``: the node agents hold host and disk);
    ``on_cuda`` resolves ``dtype=auto`` for where the engine runs (``concrete_dtype``). Raises ``ConfigError``
    for settings no engine can honour, e.g. a device tier above ``kv_device_budget_bytes``."""
    from qwen3vl_ray.engine.config import EngineConfig

    return EngineConfig(
        chunk_tokens=s.chunk_tokens, dtype=resolved_dtype(s, on_cuda), device=s.device,
        attn_implementation=s.attn_implementation, max_pixels=s.max_pixels,
        kv_device_budget_bytes=s.kv_device_budget_bytes,  # EngineConfig refuses a device tier above it, by name
        tiers=tiers if tiers is not None else tier_configs(s), policy=s.policy,
        prefix_cache=s.prefix_cache, vision_cache=s.vision_cache, session_idle_s=s.session_idle_s,
        tenant=s.tenant, fingerprint=s.fingerprint)


# -- docs ------------------------------------------------------------------------------------------------

def markdown() -> str:
    """The configuration reference (docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m qwen3vl_ray.settings --markdown > docs/configuration.md`; "
        "tests/test_settings.py keeps it in sync. Edit qwen3vl_ray/settings.py, not this file. -->",
        "",
        "Every option has one name, one default and one environment variable, shared by the CLI "
        "(`qwen3vl-ray ...`), the Ray jobs (`python -m jobs.infer ...`) and the library "
        "(`qwen3vl_ray.settings.resolve()`). Precedence: a CLI flag (or keyword) over the environment "
        "over the default. Byte sizes accept `1048576`, `64MiB`, `2GiB`, `500MB`; booleans `1/0`, "
        "`true/false`. An unknown `QWEN3VL_RAY_*` variable is an error (catches typos).",
        "",
        "Inside `ray job submit`, pass variables with `--runtime-env-json '{\"env_vars\": {...}}'` or set "
        "them on the nodes (cluster.yaml does this for `QWEN3VL_RAY_DISK_DIR`).",
        "",
    ]
    for section in SECTIONS:
        lines += [f"## {section}", "", "| flag | environment variable | default | unit | feeds | description |",
                  "|---|---|---|---|---|---|"]
        for o in OPTIONS:
            if o.section != section:
                continue
            desc = o.help + (f" One of: {', '.join(o.choices)}." if o.choices else "")
            default = o.default_text()
            lines.append(f"| `{o.flag}` | `{o.env}` | `{default}` | {o.unit} | `{o.target}` | {desc} |")
        lines.append("")
    return "\n".join(lines)


SECRET_OPTIONS = frozenset({"tenant_key"})
"""Options whose values are never printed."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print the configuration reference or the resolved settings.")
    p.add_argument("--markdown", action="store_true", help="print docs/configuration.md")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown())
    else:
        s = resolve()
        for o in OPTIONS:
            value = "<set>" if o.name in SECRET_OPTIONS and s[o.name] else s[o.name]
            print(f"{o.name:22} {value!s:40} ({s.source(o.name)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
