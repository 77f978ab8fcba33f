"""The baseline the engine must match: plain ``model.generate`` on the same chat, without any store.

Used by the correctness tests and the benchmarks; it builds the prompt through the same template and image
loading as the engine so that only the store differs.
"""

from __future__ import annotations

from typing import Any

import torch

from qwen3vl_ray.engine.images import load_image
from qwen3vl_ray.engine.prompt import _template_messages
from qwen3vl_ray.engine.requests import validate_messages


@torch.inference_mode()
def reference_generate(model: Any, processor: Any, messages: list[dict[str, Any]], max_new_tokens: int,
                       max_pixels: int = 4096 * 4096, return_logits: bool = False) -> list[int] | tuple[list[int], torch.Tensor]:
    """Greedy ``model.generate`` token ids for ``messages`` (and the per-step logits if asked)."""
    validate_messages(messages)
    tmpl, items = _template_messages(messages)
    images = [load_image(it, max_pixels) for it in items]
    text = processor.apply_chat_template(tmpl, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images or None, return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=return_logits, return_dict_in_generate=True)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    if return_logits:
        return ids, torch.stack([l[0] for l in out.logits])
    return ids
