"""Configuration of the Ray service: node agents, coordinator policies, workers.

One dataclass per subsystem, each field documented with its unit and default and validated on
construction. The users' options (flags, ``QWEN3VL_RAY_*`` variables, defaults) live in one table,
``qwen3vl_ray.settings``; ``ServiceConfig.from_settings`` / ``from_env`` map them onto these dataclasses, on
top of the settings' own builders. A field an option feeds (``Option.target``) defaults to that option's
default (``settings.default``), so ``ServiceConfig()`` and ``from_settings`` of default settings agree;
``tests/test_config_defaults.py`` checks every such field and names the exceptions. An option the Ray
service cannot honour is a ``ConfigError`` naming it when set, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from actors.tenancy import Tenant
from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.settings import default

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""Log line format of the actors, the CLI and the jobs."""
NAMESPACE = "qwen3vl_ray"
"""Ray namespace every named actor of the service lives in."""
DEFAULT_ENGINE = "actors.engine_adapter:Qwen3VLEngineAdapter"
"""What workers run unless told otherwise: the real Qwen3-VL engine."""
REAL_ENGINE_NAME = "qwen3vl"
"""The users' name (``--engine``) of the real Qwen3-VL engine."""


@dataclass
class AgentConfig:
    """One node agent: the node's host tier (Ray object store) and disk tier.

    Attributes:
        host_bytes: host-tier budget in the node's object store, bytes (default 1 GiB). Keep it below the
            node's ``object_store_memory`` so Ray never spills our entries to its own spill directory.
        host_codec: codec spec applied to host entries on store (default ``"none"``: raw bytes, zero-copy).
        disk_bytes: disk-tier budget, bytes (default 8 GiB). 0 disables the disk tier.
        disk_dir: parent directory of the disk tiers (default ``~/.cache/qwen3vl-ray/disk-tier``, ``~`` expanded on
            construction; it must be
            owned by this user and not writable by others). Never Ray's spill directory. Each node agent of the
            default tenant uses ``<disk_dir>/machine-<machine tag>-<slot>`` (another tenant's
            ``<disk_dir>/tenant-<tenant id>/machine-...``): named by the machine
            (and disk), not the Ray node id, so a restarted node or a later run serves what an earlier one
            stored; the slot (lowest free, flock-held while the agent lives) keeps agents of a one-machine
            cluster apart. Unheld directories of other machines, slots or namespaces count against
            ``disk_bytes`` and the least recently written go when over it (``qwen3vl_ray.tiers.disk_home``).
        disk_codec: codec spec of disk entries (default ``"none"``).
        disk_fsync: fsync each disk store (crash safety; default True).
        policy: eviction policy name inside the node (``qwen3vl_ray.policies``); default the project default
            (None means the same).
        high_watermark: fraction of a tier's budget above which the agent reports pressure (0.9).
        low_watermark: fraction that pressure relief drains a tier down to (0.75).
        idle_ttl_s: entries of the host and disk tiers neither read nor written for this long are dropped (and
            leave the coordinator's directory), checked on each coordinator pass; seconds (default 0: never, they
            stay until evicted).
    """

    host_bytes: int = default("host_bytes")
    host_codec: str = default("host_codec")
    disk_bytes: int = default("disk_bytes")
    disk_dir: str = default("disk_dir")
    disk_codec: str = default("disk_codec")
    disk_fsync: bool = default("disk_fsync")
    policy: str | None = default("policy")
    high_watermark: float = default("high_watermark")
    low_watermark: float = default("low_watermark")
    idle_ttl_s: float = default("idle_ttl_s")

    def __post_init__(self) -> None:
        # the table keeps "~" (its docs read the same on every machine); expanded here, as the settings expand it,
        # so AgentConfig() and one built from default settings are the same config (config_check compares them)
        self.disk_dir = os.path.expanduser(self.disk_dir) if self.disk_dir else self.disk_dir
        if not isinstance(self.host_bytes, int) or self.host_bytes <= 0:
            raise ConfigError(f"AgentConfig.host_bytes must be a positive int, got {self.host_bytes!r}")
        if not isinstance(self.disk_bytes, int) or self.disk_bytes < 0:
            raise ConfigError(f"AgentConfig.disk_bytes must be an int >= 0, got {self.disk_bytes!r}")
        if self.disk_bytes and not self.disk_dir:
            raise ConfigError("AgentConfig.disk_dir must be set when disk_bytes > 0")
        if self.idle_ttl_s < 0:
            raise ConfigError(f"AgentConfig.idle_ttl_s must be >= 0 (0: never expire), got {self.idle_ttl_s!r}")
        if not (0.0 < self.low_watermark <= self.high_watermark <= 1.0):
            raise ConfigError(
                f"watermarks must satisfy 0 < low <= high <= 1, got low={self.low_watermark} high={self.high_watermark}")


@dataclass
class CoordinatorConfig:
    """Global policies applied by the coordinator on each pass.

    Attributes:
        period_s: seconds between periodic policy passes (default 2.0). 0 disables the loop (on demand only).
        demote_cold: move the coldest host entries to disk when a node's host tier is above its high
            watermark (default True).
        recompress_codec: codec spec cold host entries are re-encoded with before they are evicted
            (default ``"int8"``, lossy: a re-encoded entry is served within the codec's error bound, not
            bit-exact); ``""`` disables re-encoding.
        recompress_max_per_pass: at most this many entries re-encoded per node per pass (default 64).
        cluster_eviction: evict the lowest-value entries cluster-wide when the cluster's disk tiers are above
            their high watermark (default True). Value = recompute seconds saved per byte x reuse likelihood.
        recompute_s_per_mib: estimated seconds to recompute one MiB of cached state (default 0.05); scales
            the value of an entry.
        placement: place new entries on another node with room when the producing node is above its high
            watermark (default True).
        admission_limit: fraction of the cluster's total (host + disk) budget above which new sessions are
            not admitted (default 0.97).
        admission_mode: ``"reject"`` (raise ``ClusterSaturatedError``) or ``"queue"`` (wait up to
            ``admission_timeout_s`` for room, then reject). Default ``"reject"``.
        admission_timeout_s: longest wait of a queued admission, seconds (default 10.0).
        session_ttl_s: a session reservation not renewed by a request for this many seconds is released
            (default 900.0; 0 keeps reservations until released). Covers clients that exit without releasing.
        load_weight: routing: chunks of locally cached prefix one queued request is worth (default 4.0).
        node_sync_period_s: seconds between ``ray.nodes()`` checks that add/remove agents (default 5.0).
    """

    period_s: float = default("period_s")
    demote_cold: bool = True
    recompress_codec: str = default("recompress_codec")
    recompress_max_per_pass: int = 64
    cluster_eviction: bool = True
    recompute_s_per_mib: float = 0.05
    placement: bool = True
    admission_limit: float = 0.97
    admission_mode: str = default("admission")
    admission_timeout_s: float = 10.0
    session_ttl_s: float = 900.0
    load_weight: float = 4.0
    node_sync_period_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("period_s", "recompute_s_per_mib", "admission_timeout_s", "session_ttl_s", "load_weight",
                     "node_sync_period_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"CoordinatorConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.recompress_max_per_pass < 0:
            raise ConfigError(f"CoordinatorConfig.recompress_max_per_pass must be >= 0, got {self.recompress_max_per_pass}")
        if not (0.0 < self.admission_limit <= 1.0):
            raise ConfigError(f"CoordinatorConfig.admission_limit must be in (0, 1], got {self.admission_limit}")
        if self.admission_mode not in ("reject", "queue"):
            raise ConfigError(f"CoordinatorConfig.admission_mode must be 'reject' or 'queue', got {self.admission_mode!r}")


@dataclass
class WorkerConfig:
    """Qwen3-VL workers.

    Attributes:
        engine: ``"module:callable"`` returning the engine a worker wraps, called with the worker's
            ``engine_args`` (default ``"actors.engine_adapter:Qwen3VLEngineAdapter"``: the real Qwen3-VL
            engine). A factory returning a bare ``Qwen3VLEngine`` is wrapped in that adapter. The model-free
            ``"actors.synthetic_engine:SyntheticKVEngine"`` is for tests and benchmarks only. ``"qwen3vl"``
            (the users' settings name) means the default.
        engine_args: keyword arguments for the engine factory (default empty: for the real engine, the
            ``QWEN3VL_RAY_MODEL`` checkpoint directory or preset, else the ``tiny`` preset generated into
            ``~/.cache/qwen3vl-ray/checkpoints``; any ``EngineConfig`` field may be given, e.g.
            ``{"model": "/ckpt/Qwen3-VL-8B", "chunk_tokens": 256, "device_tier_bytes": 1 << 30}``).
        num_gpus: GPUs per worker; None (default) means 1 when the cluster has GPUs, else 0 (CPU workers): the
            settings' ``worker_gpus`` -1, which ``from_settings`` resolves against the cluster.
        num_cpus: CPUs reserved per worker (default 0.5).
        device_bytes: the worker's own device tier (GPU when present, else CPU memory), bytes (default 256 MiB;
            0 disables it). Hot chunks are served from it without asking the agent. Unused with an engine
            that owns its device tier (the real engine: ``engine_args["tiers"]``, else
            ``engine_args["device_tier_bytes"]``, makes it; ``from_settings`` sizes both from ``device_bytes``).
        max_retries: how many other workers a failed request is retried on (default 2).
    """

    engine: str = default("engine")  # the users' name of DEFAULT_ENGINE; __post_init__ maps it
    engine_args: dict = field(default_factory=dict)
    num_gpus: float | None = None
    num_cpus: float = default("worker_cpus")
    device_bytes: int = default("device_bytes")
    max_retries: int = default("max_retries")

    def __post_init__(self) -> None:
        if self.engine == REAL_ENGINE_NAME:  # the users' settings name for the real engine
            self.engine = DEFAULT_ENGINE
        if ":" not in self.engine:
            raise ConfigError(f"WorkerConfig.engine must be 'qwen3vl' or look like 'module:callable', got {self.engine!r}")
        if (self.num_gpus is not None and self.num_gpus < 0) or self.num_cpus < 0:
            raise ConfigError(f"WorkerConfig num_gpus/num_cpus must be >= 0, got {self.num_gpus}/{self.num_cpus}")
        if self.device_bytes < 0:
            raise ConfigError(f"WorkerConfig.device_bytes must be >= 0, got {self.device_bytes}")
        if self.max_retries < 0:
            raise ConfigError(f"WorkerConfig.max_retries must be >= 0, got {self.max_retries}")


@dataclass
class ServiceConfig:
    """The whole service: ``ServiceConfig()`` for the dataclass defaults, ``from_settings`` / ``from_env`` for the
    users' settings. ``tenant`` is whose service it is (``actors.tenancy``): each tenant runs its own coordinator,
    agents and workers, callable only with its key."""

    agent: AgentConfig = field(default_factory=AgentConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    tenant: Tenant = field(default_factory=Tenant)

    @classmethod
    def from_settings(cls, s: Any, gpus_available: bool = False, resolve_model: bool = True) -> "ServiceConfig":
        """The ServiceConfig of the users' settings (``qwen3vl_ray.settings``, the one table of options shared
        by the CLI, the jobs and the library).

        ``resolve_model``: turn a preset name into a checkpoint directory here (generated on first use, as the
        jobs do: workers then get its path); False passes the model name and checkpoint directory to the
        workers, which resolve them on their own nodes."""
        from qwen3vl_ray import settings as S

        gpus = s.worker_gpus if s.worker_gpus >= 0 else (1.0 if gpus_available else 0.0)
        storage = cls.storage_from_settings(s)
        if s.engine in (REAL_ENGINE_NAME, DEFAULT_ENGINE):
            engine, engine_args = DEFAULT_ENGINE, _adapter_args(s, gpus, resolve_model)
        else:
            S.refuse_unhonoured(s, OTHER_ENGINE_UNHONOURED,
                                f"the Ray service's plain device tier of a worker running {s.engine!r}",
                                "unset them or run --engine qwen3vl")
            engine, engine_args = s.engine, {}
        return dataclasses.replace(storage, worker=WorkerConfig(
            engine=engine, engine_args=engine_args, num_gpus=gpus, num_cpus=s.worker_cpus,
            device_bytes=s.device_bytes, max_retries=s.max_retries))

    @classmethod
    def storage_from_settings(cls, s: Any) -> "ServiceConfig":
        """The storage side of ``from_settings`` (agents, coordinator, tenant; default workers): what a service
        whose engines run elsewhere needs, as vLLM's KV connector on the node agents (``actors.kv_block_store``),
        which starts no worker and so must not be refused for the workers' engine options."""
        return cls(
            agent=AgentConfig(host_bytes=s.host_bytes, host_codec=s.host_codec, disk_bytes=s.disk_bytes,
                              disk_dir=s.disk_dir, disk_codec=s.disk_codec, disk_fsync=s.disk_fsync,
                              policy=s.policy, high_watermark=s.high_watermark, low_watermark=s.low_watermark,
                              idle_ttl_s=s.idle_ttl_s),
            coordinator=CoordinatorConfig(period_s=s.period_s, admission_mode=s.admission,
                                          recompress_codec=s.recompress_codec),
            tenant=Tenant.from_settings(s),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, gpus_available: bool = False) -> "ServiceConfig":
        """``from_settings`` of the ``QWEN3VL_RAY_*`` variables in ``environ`` (default ``os.environ``) over the
        settings' defaults; the model is resolved by the workers. Bad values raise ``ConfigError`` naming the
        variable."""
        from qwen3vl_ray import settings as S

        return cls.from_settings(S.resolve({}, env=os.environ if environ is None else environ), gpus_available,
                                 resolve_model=False)


OTHER_ENGINE_UNHONOURED = ("model", "checkpoint_dir", "device", "fingerprint", "dtype", "device_codec", "block_bytes",
                           "prefix_cache", "vision_cache", "chunk_tokens", "kv_device_budget_bytes",
                           "attn_implementation", "session_idle_s", "max_pixels")
"""Options a worker running another engine than qwen3vl cannot honour: its engine gets no settings (its
``engine_args`` are its own), and it keeps a plain device tier of ``WorkerConfig.device_bytes`` (no codec, 1 MiB
blocks, placed by ``auto``). Every option that feeds only the Qwen3-VL engine or its device tier, the tenant apart
(the service honours it: each tenant its own actors)."""


def _adapter_args(s: Any, gpus: float, resolve_model: bool) -> dict:
    """engine_args of the real engine's adapter from the users' settings: every ``EngineConfig`` field as the one
    builder (``settings.engine_config``) makes it, so the Ray workers' engines and the in-process engine share its
    defaults, its dtype rule and its checks (a device tier above ``kv_device_budget_bytes`` is refused here, on the
    driver, by name). The store is the settings' device tier only (``settings.device_tier_config``: its codec,
    block size, placement and watermarks); host and disk are the node agent's."""
    from qwen3vl_ray import settings as S

    # A preset resolved here is generated on this (the driver's) node and workers get its path: on a
    # multi-machine cluster the same path must exist on every node (cluster.yaml generates the tiny preset on
    # each node). Unresolved, each worker resolves the name on its own node.
    model = ({"checkpoint_path": S.resolve_checkpoint(s)} if resolve_model
             else {"model": s.model, "checkpoint_dir": s.checkpoint_dir})
    # dtype "auto" resolves for the workers' device (a GPU worker: bfloat16), not the driver's
    config = S.engine_config(s, tiers=[S.device_tier_config(s)], on_cuda=bool(gpus))
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}  # shallow: TierConfigs stay
    return {**model, "device_tier_bytes": s.device_bytes, **fields}


def configure_actor_logging(environ: Mapping[str, str] | None = None) -> str:
    """Set this actor process's log level (the root logger's: every ``actors.*`` and ``qwen3vl_ray.*`` logger
    inherits it) from ``QWEN3VL_RAY_ACTOR_LOG_LEVEL`` in ``environ`` (default ``os.environ``), else the settings'
    default; returns the level. Each actor calls it first thing in ``__init__``.

    The variable reaches an actor's process from, in order: a job's ``--actor-log-level`` carried in the runtime
    env of the actors the job starts (``jobs.log_levels.actor_runtime_env``: a detached actor keeps it, and the
    agents the coordinator starts inherit it), the environment an embedded Ray inherited from the command, or the
    node's own environment (cluster.yaml's ``~/.qwen3vl-ray.env``). A bad value is a ``ConfigError`` naming the
    option, as everywhere else."""
    from qwen3vl_ray import settings as S

    level = S.env_value("actor_log_level", environ)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    # basicConfig does nothing where the root logger already has a handler (Ray's LoggingConfig adds one): the
    # level is set either way
    logging.getLogger().setLevel(level)
    return level
