"""Configuration of the Ray service: node agents, coordinator policies, workers.

One dataclass per subsystem, each field documented with its unit and default and validated on
construction. ``ServiceConfig.from_env`` is the one table that maps environment variables onto it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from qwen3vl_ray.errors import ConfigError

MiB = 1 << 20
NAMESPACE = "qwen3vl_ray"
"""Ray namespace every named actor of the service lives in."""
DEFAULT_ENGINE = "actors.engine_adapter:Qwen3VLEngineAdapter"
"""What workers run unless told otherwise: the real Qwen3-VL engine."""


@dataclass
class AgentConfig:
    """One node agent: the node's host tier (Ray object store) and disk tier.

    Attributes:
        host_bytes: host-tier budget in the node's object store, bytes (default 256 MiB). Keep it below the
            node's ``object_store_memory`` so Ray never spills our entries to its own spill directory.
        host_codec: codec spec applied to host entries on store (default ``"none"``: raw bytes, zero-copy).
        disk_bytes: disk-tier budget, bytes (default 1 GiB). 0 disables the disk tier.
        disk_dir: parent directory of the disk tiers; each node uses ``<disk_dir>/node-<node id>``
            (default ``/tmp/qwen3vl_ray_disk``). Never Ray's spill directory.
        disk_codec: codec spec of disk entries (default ``"none"``).
        disk_fsync: fsync each disk store (crash safety; default True).
        policy: eviction policy name inside the node (``qwen3vl_ray.policies``); None (default) takes the
            project default.
        high_watermark: fraction of a tier's budget above which the agent reports pressure (0.9).
        low_watermark: fraction that pressure relief drains a tier down to (0.75).
    """

    host_bytes: int = 256 * MiB
    host_codec: str = "none"
    disk_bytes: int = 1024 * MiB
    disk_dir: str = "/tmp/qwen3vl_ray_disk"
    disk_codec: str = "none"
    disk_fsync: bool = True
    policy: str | None = None
    high_watermark: float = 0.9
    low_watermark: float = 0.75

    def __post_init__(self) -> None:
        if not isinstance(self.host_bytes, int) or self.host_bytes <= 0:
            raise ConfigError(f"AgentConfig.host_bytes must be a positive int, got {self.host_bytes!r}")
        if not isinstance(self.disk_bytes, int) or self.disk_bytes < 0:
            raise ConfigError(f"AgentConfig.disk_bytes must be an int >= 0, got {self.disk_bytes!r}")
        if self.disk_bytes and not self.disk_dir:
            raise ConfigError("AgentConfig.disk_dir must be set when disk_bytes > 0")
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

    period_s: float = 2.0
    demote_cold: bool = True
    recompress_codec: str = "int8"
    recompress_max_per_pass: int = 64
    cluster_eviction: bool = True
    recompute_s_per_mib: float = 0.05
    placement: bool = True
    admission_limit: float = 0.97
    admission_mode: str = "reject"
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
        num_gpus: GPUs per worker; None (default) means 1 when the cluster has GPUs, else 0 (CPU workers).
        num_cpus: CPUs reserved per worker (default 0.5).
        device_bytes: the worker's own device tier (GPU when present, else CPU memory), bytes (default 64 MiB;
            0 disables it). Hot chunks are served from it without asking the agent. Unused with an engine
            that owns its device tier (the real engine: ``engine_args["device_tier_bytes"]`` sizes it).
        max_retries: how many other workers a failed request is retried on (default 2).
    """

    engine: str = DEFAULT_ENGINE
    engine_args: dict = field(default_factory=dict)
    num_gpus: float | None = None
    num_cpus: float = 0.5
    device_bytes: int = 64 * MiB
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.engine == "qwen3vl":  # the users' settings name for the real engine
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
    """The whole service. ``ServiceConfig.from_env()`` applies the table ``ENV`` on top of the defaults."""

    agent: AgentConfig = field(default_factory=AgentConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "ServiceConfig":
        env = os.environ if environ is None else environ
        cfg = cls()
        for var, (section, name) in ENV.items():
            if var in env:
                target = getattr(cfg, section)
                kind = {f.name: f.type for f in fields(target)}[name].replace(" | None", "")
                raw = env[var]
                try:
                    value = {"int": int, "float": float, "bool": lambda s: s.lower() in ("1", "true", "yes")}.get(kind, str)(raw)
                except ValueError as exc:
                    raise ConfigError(f"{var}={raw!r} is not a valid {kind}") from exc
                setattr(target, name, value)
                target.__post_init__()
        # The real engine's model: passed explicitly so the workers and the client-side router (which
        # computes the same keys) resolve the same checkpoint whatever their own environments hold.
        for var, arg in ENGINE_ARGS_ENV.items():
            if var in env and env[var] and cfg.worker.engine == DEFAULT_ENGINE:
                cfg.worker.engine_args[arg] = env[var]
        return cfg


#: environment variable -> (config section, field)
ENV: dict[str, tuple[str, str]] = {
    "QWEN3VL_RAY_HOST_BYTES": ("agent", "host_bytes"),
    "QWEN3VL_RAY_DISK_BYTES": ("agent", "disk_bytes"),
    "QWEN3VL_RAY_DISK_DIR": ("agent", "disk_dir"),
    "QWEN3VL_RAY_HOST_CODEC": ("agent", "host_codec"),
    "QWEN3VL_RAY_POLICY": ("agent", "policy"),
    "QWEN3VL_RAY_PERIOD_S": ("coordinator", "period_s"),
    "QWEN3VL_RAY_ADMISSION": ("coordinator", "admission_mode"),
    "QWEN3VL_RAY_ENGINE": ("worker", "engine"),
    "QWEN3VL_RAY_WORKER_GPUS": ("worker", "num_gpus"),
}

#: environment variable -> engine_args key of the default (real) engine
ENGINE_ARGS_ENV: dict[str, str] = {
    "QWEN3VL_RAY_MODEL": "model",
    "QWEN3VL_RAY_CHECKPOINT_DIR": "checkpoint_dir",
}
