"""Configuration of one storage tier."""

from __future__ import annotations

from dataclasses import dataclass

from qwen3vl_ray.errors import ConfigError

TIER_KINDS = ("device", "host", "disk")
MiB = 1 << 20


@dataclass
class TierConfig:
    """One level of the hierarchy. Listed top (fastest) to bottom in a cache config.

    Attributes:
        kind: ``"device"`` (block pool on the model's device), ``"host"`` (process memory; the Ray layer
            swaps in an object-store tier of the same kind) or ``"disk"`` (files under ``path``).
        capacity_bytes: byte budget; the tier never holds more. Must be > 0.
        codec: codec spec applied on store (``"none"``, ``"int8"``, ``"int8+zstd"``, ...). Default none.
        path: disk tier directory (created 0700; ``~`` expanded). Required for ``disk``; keep it apart from
            Ray's spill dir. It must be the running user's and writable by nobody else, and no directory above
            it writable by a stranger: the tier refuses anything else (never under a shared ``/tmp`` path).
        device: device tier placement: ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda:N"``.
        block_bytes: pool block size for device/host tiers, bytes (default 1 MiB). Entries take
            ceil(size / block) blocks, so accounting is in whole blocks. The engine lowers it for its
            store so a KV chunk fills whole blocks (``engine.prefix_kv.chunk_fitted_tiers``).
        pinned: host tier: page-lock its slab when CUDA is present (fast async H2D/D2H). Default True.
        zero_on_release: device/host tiers: zero the blocks of a removed or replaced entry, so the bytes of one
            tenant's entry are never left in a slab that the next entry (any tenant's) gets. Default True;
            the cost is one memset of the released bytes (``python -m benchmarks.pools``).
        fsync: disk tier: fsync file and directory on each store (crash safety). Default True.
        high_watermark: fraction of capacity above which the pressure monitor reports pressure (0.9).
        low_watermark: fraction that pressure relief drains the tier down to (0.75).
    """

    kind: str
    capacity_bytes: int
    codec: str = "none"
    path: str | None = None
    device: str = "auto"
    block_bytes: int = 1 * MiB
    pinned: bool = True
    zero_on_release: bool = True
    fsync: bool = True
    high_watermark: float = 0.9
    low_watermark: float = 0.75

    def __post_init__(self) -> None:
        if self.kind not in TIER_KINDS:
            raise ConfigError(f"unknown tier kind {self.kind!r}; allowed: {', '.join(TIER_KINDS)}")
        if not isinstance(self.capacity_bytes, int) or self.capacity_bytes <= 0:
            raise ConfigError(f"{self.kind} tier capacity_bytes must be a positive int, got {self.capacity_bytes!r}")
        if self.block_bytes <= 0:
            raise ConfigError(f"block_bytes must be > 0, got {self.block_bytes}")
        if self.kind == "disk" and not self.path:
            raise ConfigError("disk tier needs a path")
        if not (0.0 < self.low_watermark <= self.high_watermark <= 1.0):
            raise ConfigError(
                f"watermarks must satisfy 0 < low <= high <= 1, got low={self.low_watermark} high={self.high_watermark}"
            )
