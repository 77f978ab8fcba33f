"""The Qwen3-VL engine on the tiered store (prefix KV reuse, vision-feature cache, sessions).

Names load on first use so that importing the store alone never pulls in transformers.
"""

from qwen3vl_ray import _lazy_getattr

_LAZY = {
    "Qwen3VLEngine": "qwen3vl_ray.engine.engine",
    "EngineConfig": "qwen3vl_ray.engine.config",
    "Request": "qwen3vl_ray.engine.requests",
    "SamplingParams": "qwen3vl_ray.engine.requests",
    "Result": "qwen3vl_ray.engine.requests",
    "Metrics": "qwen3vl_ray.engine.requests",
    "RequestError": "qwen3vl_ray.engine.requests",
    "ImageError": "qwen3vl_ray.engine.images",
    "make_checkpoint": "qwen3vl_ray.engine.checkpoint",
    "model_fingerprint": "qwen3vl_ray.engine.checkpoint",
    "load_model_and_processor": "qwen3vl_ray.engine.loading",
    "reference_generate": "qwen3vl_ray.engine.reference",
}

__all__ = sorted(_LAZY)

__getattr__ = _lazy_getattr(__name__, _LAZY)
