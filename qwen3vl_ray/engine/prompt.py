"""Turning a chat into model inputs: template, tokens, preprocessed pixels and per-image content hashes.

An image's hash covers its *preprocessed* pixels plus its grid, so the processor's resize settings are part
of the key (the same photo at another resolution is another image) while re-encoding the same file (PNG
vs. bytes vs. PIL) is not.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from qwen3vl_ray.engine.images import load_image
from qwen3vl_ray.engine.requests import RequestError, validate_messages
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


def _image_places(messages: list[dict[str, Any]]) -> list[str]:
    """``messages[i].content[j]`` of each image item, in the order ``_template_messages`` returns them."""
    return [f"messages[{i}].content[{j}]" for i, m in enumerate(messages) if not isinstance(m["content"], str)
            for j, item in enumerate(m["content"]) if item["type"] == "image"]


def _vision_tokens(processor: Any) -> list[str]:
    """The tokens only the template may write: typed in text they would become image placeholders."""
    names = ("image_token", "video_token", "vision_start_token", "vision_end_token")
    return [t for t in (getattr(processor, n, None) for n in names) if t]


def check_text(messages: list[dict[str, Any]], processor: Any) -> None:
    """Refuse text items that contain a vision token (``<|image_pad|>``, ``<|vision_start|>``, ...).

    Plain transformers renders such text into the prompt as the real token, so ``<|image_pad|>`` counts
    as an image placeholder: with no image to fill it the processor raises ``ValueError`` (a count
    mismatch), or the model does at generate. Their ids cannot be told apart from the template's, so
    the request is refused with a :class:`RequestError` naming the token and where it was typed. Chat
    control tokens (``<|im_start|>``, ``<|im_end|>``) are left as transformers leaves them."""
    tokens = _vision_tokens(processor)
    for i, m in enumerate(messages):
        content = m["content"]
        if isinstance(content, str):
            texts = [(f"messages[{i}].content", content)]
        else:
            texts = [(f"messages[{i}].content[{j}].text", item["text"])
                     for j, item in enumerate(content) if item["type"] == "text"]
        for where, text in texts:
            for token in tokens:
                if token in text:
                    raise RequestError(f"{where} contains the vision token {token!r}, which only the chat template "
                                       "may place (one per image item); remove it or pass the image as an image item")


class ImageMemo:
    """Preprocessed pixels, grid and content hash of recently seen images, keyed by the decoded image.

    Preprocessing and hashing a 1024x1024 image costs more than loading its whole KV from host memory,
    so a repeated image skips both. The key is a 128-bit hash of the decoded RGB bytes, size and the
    preprocessing settings; the entry is exactly what preprocessing would produce again."""

    def __init__(self, capacity_bytes: int = 256 << 20):
        self.capacity_bytes = capacity_bytes
        self.settings: bytes | None = None  # the image processor's settings, part of every key
        self._entries: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor, bytes]] = OrderedDict()
        self._bytes = 0

    def get(self, key: bytes) -> tuple[torch.Tensor, torch.Tensor, bytes] | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key: bytes, pixels: torch.Tensor, grid: torch.Tensor, digest: bytes) -> None:
        size = pixels.numel() * pixels.element_size()
        if size > self.capacity_bytes:
            return
        self._entries[key] = (pixels, grid, digest)
        self._bytes += size
        while self._bytes > self.capacity_bytes:
            _, (p, _, _) = self._entries.popitem(last=False)
            self._bytes -= p.numel() * p.element_size()


def _preprocess(processor: Any, img: Image.Image, memo: ImageMemo | None) -> tuple[torch.Tensor, torch.Tensor, bytes]:
    """(pixel rows, grid (3,), content hash) of one image, from the memo when the same image was seen."""
    ip = processor.image_processor
    key = b""
    if memo:
        if memo.settings is None:  # one processor per engine: its settings are read once
            memo.settings = repr(sorted((k, repr(v)) for k, v in ip.to_dict().items())).encode()
        key = content_hash(img.mode.encode(), repr(img.size).encode(), memo.settings, img.tobytes())
    hit = memo.get(key) if memo else None
    if hit is not None:
        return hit
    out = ip(images=[img], return_tensors="pt")
    pixels, grid = out["pixel_values"], out["image_grid_thw"][0].long()
    digest = content_hash(pixels.float().contiguous().numpy(), grid.numpy())
    if memo:
        memo.put(key, pixels, grid, digest)
    return pixels, grid, digest


def build_prompt(processor: Any, messages: list[dict[str, Any]], max_pixels: int, image_token_id: int,
                 memo: ImageMemo | None = None) -> Prompt:
    """Validate ``messages``, load their images and preprocess them. Raises RequestError / ImageError.

    The image-token counts below are invariants once ``check_text`` has refused vision tokens in user text.

    Same result as ``processor(text=..., images=...)`` (each image is preprocessed on its own, as the
    processor does, and its placeholder expanded to grid_t*grid_h*grid_w / merge^2 tokens)."""
    validate_messages(messages)
    check_text(messages, processor)
    tmpl, image_items = _template_messages(messages)
    pil_images = [load_image(item, max_pixels, where) for item, where in zip(image_items, _image_places(messages))]
    text = processor.apply_chat_template(tmpl, tokenize=False, add_generation_prompt=True)
    pre = [_preprocess(processor, img, memo) for img in pil_images]
    merge = int(getattr(processor.image_processor, "merge_size", 2))
    image_token = processor.image_token
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(pre):
        raise AssertionError(f"template produced {len(pieces) - 1} image placeholders for {len(pre)} images")
    expanded = pieces[0]
    for (_, grid, _), piece in zip(pre, pieces[1:]):
        expanded += image_token * (int(grid.prod()) // (merge * merge)) + piece
    ids = processor.tokenizer(expanded, return_tensors="pt")["input_ids"][0].long()
    mm = (ids == image_token_id).long()
    images: list[PromptImage] = []
    runs = _runs(ids == image_token_id)
    if len(runs) != len(pre):
        raise AssertionError(f"{len(runs)} image-token runs for {len(pre)} images")
    patch = 0
    for (start, end), (pixels, grid, digest) in zip(runs, pre):
        n_patches = int(grid.prod())
        if n_patches // (merge * merge) != end - start or pixels.shape[0] != n_patches:
            raise AssertionError(f"image span of {end - start} tokens for grid {grid.tolist()}")
        images.append(PromptImage(digest, start, end, patch, patch + n_patches, grid))
        patch += n_patches
    pixel_values = torch.cat([p for p, _, _ in pre]) if pre else None
    grid_thw = torch.stack([g for _, g, _ in pre]) if pre else None
    return Prompt(ids, mm, pixel_values, grid_thw, images)


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
