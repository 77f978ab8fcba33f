"""Load a local Qwen3-VL checkpoint (real or generated) with transformers.

The model always comes from ``<Class>.from_pretrained(path, local_files_only=True, ...)``. The
processor comes from ``AutoProcessor.from_pretrained(path, local_files_only=True)`` when torchvision
is installed. transformers 5.24 cannot construct ``Qwen3VLProcessor`` at all without torchvision (its
video processor is torchvision-only and the processor type-checks every sub-processor), so without
it we load ``ImageTextQwen3VLProcessor``: the same class minus the video processor, fed by the same
files (tokenizer, chat template, image processor config via the PIL backend). Images and text
behave identically; video input raises a clear error.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from qwen3vl_ray.errors import ConfigError

logger = logging.getLogger(__name__)

#: model_type -> transformers class name
SUPPORTED_MODEL_TYPES = {
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}
_DTYPES = ("auto", "float32", "bfloat16", "float16")


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def check_checkpoint(path: str | os.PathLike) -> tuple[Path, dict]:
    """Validate ``path`` as a supported checkpoint; return (path, parsed config.json).

    FileNotFoundError names a missing path, config.json or safetensors weights; ConfigError names an
    unsupported model_type.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"model path {str(root)!r} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"model path {str(root)!r} is not a directory")
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model path {str(root)!r} has no config.json (not a transformers checkpoint)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {str(cfg_file)!r}: {e}") from e
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"checkpoint {str(root)!r} has model_type {model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    if not any(root.glob("*.safetensors")):
        # Only safetensors: .bin weights are pickles, which this project never loads.
        raise FileNotFoundError(f"model path {str(root)!r} has no *.safetensors weights")
    return root, cfg


def _resolve_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
        if name in _DTYPES:
            return dtype
    elif isinstance(dtype, str) and dtype in _DTYPES:
        return dtype if dtype == "auto" else getattr(torch, dtype)
    raise ConfigError(f"unsupported dtype {dtype!r}; allowed: {list(_DTYPES)} or the matching torch.dtype")


def load_processor(path: str | os.PathLike):
    """The checkpoint's processor (see module docstring for the torchvision-less fallback)."""
    root, _ = check_checkpoint(path)
    if torchvision_available():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(root, local_files_only=True)
    from qwen3vl_ray.engine.processor import ImageTextQwen3VLProcessor

    return ImageTextQwen3VLProcessor.from_pretrained(root, local_files_only=True)


def load_model_and_processor(
    path: str | os.PathLike,
    *,
    dtype="float32",
    device="cpu",
    attn_implementation: str = "sdpa",
):
    """Load (model, processor) from a local checkpoint directory; model in eval mode on ``device``.

    ``dtype``: "auto" (as saved), "float32", "bfloat16", "float16" or a torch.dtype.
    ``attn_implementation``: "sdpa" (default: fused, never materialises the score matrix),
    "flash_attention_2", "eager", ... as transformers accepts.
    """
    import torch
    import transformers

    root, cfg = check_checkpoint(path)
    torch_dtype = _resolve_dtype(dtype)
    cls = getattr(transformers, SUPPORTED_MODEL_TYPES[cfg["model_type"]])
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"bad device {device!r}: {e}") from e
    model = cls.from_pretrained(
        root,
        local_files_only=True,
        use_safetensors=True,
        dtype=torch_dtype,
        attn_implementation=attn_implementation,
    )
    model = model.to(device).eval()
    processor = load_processor(root)
    logger.info("loaded %s from %s (%s, %s, attn=%s)", cls.__name__, root, model.dtype, device, attn_implementation)
    return model, processor
