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


def _lazy_getattr(package: str, table: dict[str, str]):
    """A package's module ``__getattr__`` (PEP 562): ``name`` imported from module ``table[name]`` on first use."""
    def __getattr__(name: str):
        if name in table:
            return getattr(import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__


__getattr__ = _lazy_getattr(__name__, _LAZY)
