"""qwen3vl-ray core library: tiered tensor store, codecs and the Qwen3-VL engine. No Ray import here.

Heavy parts (transformers) load on first use, so ``import qwen3vl_ray`` stays cheap for the store alone.
"""

from importlib import import_module

_LAZY = {
    "TieredCache": "qwen3vl_ray.cache",
    "CacheConfig": "qwen3vl_ray.cache",
    "TierConfig": "qwen3vl_ray.tiers.config",
    "Namespace": "qwen3vl_ray.keys",
    "make_codec": "qwen3vl_ray.codecs",
    "make_checkpoint": "qwen3vl_ray.engine.checkpoint",
    "Qwen3VLEngine": "qwen3vl_ray.engine",
    "EngineConfig": "qwen3vl_ray.engine",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwen3vl_ray' has no attribute {name!r}")
