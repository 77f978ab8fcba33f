"""Turning a chat into model inputs: template, tokens, preprocessed pixels and per-image content hashes.

An image's hash covers its *preprocessed* pixels plus its grid, so the processor's resize settings are part
of the key (the same photo at another resolution is another image) while re-encoding the same file (PNG
vs. bytes vs. PIL) is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qwen3vl_ray.engine.images import load_image
from qwen3vl_ray.engine.requests import validate_messages
from qwen3vl_ray.keys import ImageSpan, content_hash


@dataclass(slots=True)
class PromptImage:
    """One image of a prompt: its content hash, its token span [start, end) and its patch rows."""

    content_hash: bytes
    start: int
    end: int
    patch_start: int
    patch_end: int
    grid_thw: torch.Tensor  # (3,) long

    @property
    def span(self) -> ImageSpan:
        return ImageSpan(self.content_hash, self.start, self.end)


@dataclass(slots=True)
class Prompt:
    """Everything the engine needs about one prompt, on CPU."""

    input_ids: torch.Tensor  # (L,) long
    mm_token_type_ids: torch.Tensor  # (L,) long, 1 at image tokens
    pixel_values: torch.Tensor | None  # (patches, 1536) float32
    image_grid_thw: torch.Tensor | None  # (n_images, 3) long
    images: list[PromptImage]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _template_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Messages for the chat template (images as bare markers) and the image items in order."""
    out, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        items = []
        for item in content:
            if item["type"] == "image":
                images.append(item)
                items.append({"type": "image"})
            else:
                items.append({"type": "text", "text": item["text"]})
        out.append({"role": m["role"], "content": items})
    return out, images


def build_prompt(processor: Any, messages: list[dict[str, Any]], max_pixels: int, image_token_id: int) -> Prompt:
    """Validate ``messages``, load their images and run the processor. Raises RequestError / ImageError."""
    validate_messages(messages)
    tmpl, image_items = _template_messages(messages)
    pil_images = [load_image(item, max_pixels) for item in image_items]
    text = processor.apply_chat_template(tmpl, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=pil_images or None, return_tensors="pt")
    ids = enc["input_ids"][0].long()
    mm = enc.get("mm_token_type_ids")
    mm = mm[0].long() if mm is not None else (ids == image_token_id).long()
    pixel_values = enc.get("pixel_values") if pil_images else None
    grid = enc.get("image_grid_thw") if pil_images else None
    images: list[PromptImage] = []
    if pil_images:
        runs = _runs(ids == image_token_id)
        if len(runs) != len(pil_images):
            raise AssertionError(f"{len(runs)} image-token runs for {len(pil_images)} images")
        merge = int(getattr(processor.image_processor, "merge_size", 2))
        patch = 0
        for (start, end), thw in zip(runs, grid):
            n_patches = int(thw.prod())
            if n_patches // (merge * merge) != end - start:
                raise AssertionError(f"image span of {end - start} tokens for grid {thw.tolist()}")
            rows = pixel_values[patch:patch + n_patches]
            digest = content_hash(rows.float().contiguous().numpy(), thw.long().numpy())
            images.append(PromptImage(digest, start, end, patch, patch + n_patches, thw.long().clone()))
            patch += n_patches
    return Prompt(ids, mm, pixel_values, grid, images)


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool mask."""
    idx = torch.nonzero(mask).flatten().tolist()
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
