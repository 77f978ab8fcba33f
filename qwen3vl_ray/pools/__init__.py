"""Block pools: preallocated fixed-size slots, acquired and released through handles."""

from qwen3vl_ray.pools.block_pool import BlockPool, PoolStats, SlotHandle, pinning_available, resolve_device  # noqa: F401
from qwen3vl_ray.pools.manager import PoolManager  # noqa: F401
