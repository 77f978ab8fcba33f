"""Configuration of the Qwen3-VL engine (one dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.policies import POLICIES
from qwen3vl_ray.settings import default
from qwen3vl_ray.tiers.config import TierConfig

MiB = 1 << 20
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ATTN = ("sdpa", "flash_attention_2", "flash_attention_3", "eager")


def _default_tiers() -> list[TierConfig]:
    return [TierConfig("device", default("device_bytes")), TierConfig("host", default("host_bytes"))]


@dataclass
class EngineConfig:
    """How the engine loads the model and where it keeps reusable state.

    Defaults are the option table's (``qwen3vl_ray.settings``, read through ``settings.default``), so an
    ``EngineConfig()`` and one built from default settings (``settings.engine_config``) agree; the exceptions
    are named below and in ``tests/test_config_defaults.py``.

    Attributes:
        chunk_tokens: tokens per KV chunk, the unit of prefix reuse and of storage (default 256).
            A prompt's trailing partial chunk is recomputed unless a session holds it.
        dtype: model and KV dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``. Always concrete,
            never the settings' ``"auto"``: the dtype is part of every cache key's namespace, and a router
            computes keys client-side from this config, possibly on a machine without the workers' GPU; the
            builders resolve auto where the device is known (``settings.resolved_dtype``).
        device: ``"auto"`` (CUDA if present, else CPU; default), ``"cpu"`` or ``"cuda:N"``.
        attn_implementation: transformers attention backend, default ``"sdpa"`` (fused: the attention
            score matrix is never materialised, which is why nothing "compresses attention scores").
        max_pixels: largest decoded image accepted, in pixels (width x height), default 1,048,576
            (1024 x 1024, the settings' default). Larger images are refused with an error naming the size,
            not resized.
        kv_device_budget_bytes: bytes of accelerator memory for KV: the store's device tier plus the
            live KV of the running request (default 1 GiB). A request whose own KV cannot fit even
            with the device tier emptied fails with a ``CapacityError`` message.
        tiers: the store's tiers, top (fastest) first; default a ``device_bytes`` (256 MiB) device and a
            ``host_bytes`` (1 GiB) host tier.
            The device tier's capacity must not exceed ``kv_device_budget_bytes``.
        policy: eviction policy name (``qwen3vl_ray.policies.POLICIES``); default the project default
            ``qwen3vl_ray.policies.DEFAULT_POLICY`` (None means the same).
        prefix_cache: reuse and store prompt KV chunks (default True).
        vision_cache: reuse and store image embeddings + DeepStack features (default True).
        session_idle_s: seconds without a turn after which a session counts as idle and is the first
            to be swapped down the tiers under device pressure (default 30.0).
        tenant: namespace tenant; tenants never share entries (default ``"default"``).
        fingerprint: how the model is identified in the key namespace: ``"full"`` (default) hashes every
            weight byte, once per checkpoint version and machine (remembered by file sizes and mtimes);
            ``"sampled"`` reads ~4 MiB per weight file (instant, but two checkpoints differing only between
            the samples would share entries).
    """

    chunk_tokens: int = default("chunk_tokens")
    dtype: str = "float32"  # concrete: see the docstring (settings: "auto")
    device: str = default("device")
    attn_implementation: str = default("attn_implementation")
    max_pixels: int = default("max_pixels")
    kv_device_budget_bytes: int = default("kv_device_budget_bytes")
    tiers: list[TierConfig] = field(default_factory=_default_tiers)
    policy: str | None = default("policy")
    prefix_cache: bool = default("prefix_cache")
    vision_cache: bool = default("vision_cache")
    session_idle_s: float = default("session_idle_s")
    tenant: str = default("tenant")
    fingerprint: str = default("fingerprint")

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens <= 0:
            raise ConfigError(f"chunk_tokens must be a positive int, got {self.chunk_tokens!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.attn_implementation not in _ATTN:
            raise ConfigError(f"attn_implementation must be one of {', '.join(_ATTN)}, got {self.attn_implementation!r}")
        if not isinstance(self.max_pixels, int) or self.max_pixels <= 0:
            raise ConfigError(f"max_pixels must be a positive int, got {self.max_pixels!r}")
        if not isinstance(self.kv_device_budget_bytes, int) or self.kv_device_budget_bytes <= 0:
            raise ConfigError(f"kv_device_budget_bytes must be a positive int, got {self.kv_device_budget_bytes!r}")
        if self.fingerprint not in ("full", "sampled"):
            raise ConfigError(f"fingerprint must be 'full' or 'sampled', got {self.fingerprint!r}")
        if not self.tiers:
            raise ConfigError("tiers must list at least one TierConfig")
        kinds = [t.kind for t in self.tiers]
        order = {"device": 0, "host": 1, "disk": 2}
        if [order[k] for k in kinds] != sorted(order[k] for k in kinds) or len(set(kinds)) != len(kinds):
            raise ConfigError(f"tiers must be distinct and ordered device, host, disk; got {kinds}")
        for t in self.tiers:
            if t.kind == "device" and t.capacity_bytes > self.kv_device_budget_bytes:
                raise ConfigError(
                    f"device tier capacity {t.capacity_bytes} exceeds kv_device_budget_bytes {self.kv_device_budget_bytes}"
                )
        if self.policy is not None and self.policy not in POLICIES:
            raise ConfigError(f"unknown eviction policy {self.policy!r}; valid: {', '.join(sorted(POLICIES))}")
        if self.session_idle_s < 0:
            raise ConfigError(f"session_idle_s must be >= 0, got {self.session_idle_s}")
        if not self.tenant:
            raise ConfigError("tenant must be a non-empty string")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        return torch.device(self.device)
