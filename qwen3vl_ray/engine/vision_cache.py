"""Vision-feature cache: an image's merged embeddings and DeepStack features, stored by image hash.

A hit skips the vision encoder for that image. One entry is one tensor ``[1 + n_deepstack, tokens,
out_hidden]``: row 0 the merged embedding the LLM sees at the image's token positions, rows 1.. the
DeepStack features added after the first decoder layers. The key is ``content_key(namespace, "vision",
image_hash)`` where the image hash covers the preprocessed pixels and the grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from qwen3vl_ray.errors import CapacityError, CodecError
from qwen3vl_ray.keys import CacheKey, Namespace, content_key

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ImageFeatures:
    """One image's features: ``embeds`` (tokens, hidden) and one (tokens, hidden) per DeepStack layer."""

    embeds: torch.Tensor
    deepstack: list[torch.Tensor]

    def pack(self) -> torch.Tensor:
        return torch.stack([self.embeds, *self.deepstack]).contiguous()

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> "ImageFeatures":
        return cls(packed[0], list(packed[1:]))


class VisionCache:
    """Looks up and stores per-image features in a TieredCache."""

    def __init__(self, store: Any, namespace: Namespace):
        self.store = store
        self.namespace = namespace
        self._warned = False

    def key(self, image_hash: bytes) -> CacheKey:
        return content_key(self.namespace, "vision", image_hash)

    def get(self, image_hash: bytes, n_tokens: int, n_deepstack: int) -> ImageFeatures | None:
        packed = self.store.get(self.key(image_hash))
        if packed is None:
            return None
        if tuple(packed.shape[:2]) != (1 + n_deepstack, n_tokens):
            # The hash covers pixels and grid, so this means a bug or a foreign entry: never use it.
            logger.warning("vision entry has shape %s, expected (%d, %d, ...); ignoring it",
                           tuple(packed.shape), 1 + n_deepstack, n_tokens)
            return None
        return ImageFeatures.unpack(packed)

    def put(self, image_hash: bytes, features: ImageFeatures) -> bool:
        """Store the features; False (logged once) if the store cannot take them, which only costs speed:
        e.g. a tier whose codec is KV-only (``kv-int8``) refuses non-KV tensors, or no tier is big enough."""
        try:
            return bool(self.store.put(self.key(image_hash), features.pack()))
        except (CodecError, CapacityError) as exc:
            if not self._warned:
                logger.warning("vision features not cached: %s", exc)
                self._warned = True
            return False
