"""A transformers cache layer that writes new tokens into a preallocated buffer.

``DynamicLayer.update`` concatenates the whole cache with each new token, so a decode step at 3,000 tokens
copies all of its KV into fresh memory (page faults included); after a prefix load that copy costs as much
as the load itself. This layer keeps ``[1, kv_heads, capacity, head_dim]`` buffers, copies only the new
tokens in, and exposes ``keys``/``values`` as views of the filled part, which is all attention reads.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """One layer's KV in a buffer of fixed capacity; grows (by doubling, one copy) only if it must."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int = 0):
        super().__init__()
        assert key_buffer.shape == value_buffer.shape and length <= key_buffer.shape[-2]
        self._kbuf, self._vbuf = key_buffer, value_buffer
        self.device = key_buffer.device
        self.is_initialized = True
        self._set_length(length)

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self._kbuf[:, :, :length]
        self.values = self._vbuf[:, :, :length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the buffers exist from construction

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        n = key_states.shape[-2]
        end = self.length + n
        if end > self._kbuf.shape[-2]:
            cap = max(end, 2 * self._kbuf.shape[-2])
            shape = (*self._kbuf.shape[:2], cap, self._kbuf.shape[-1])
            kb = self._kbuf.new_empty(shape)
            vb = self._vbuf.new_empty(shape)
            kb[:, :, :self.length].copy_(self.keys)
            vb[:, :, :self.length].copy_(self.values)
            self._kbuf, self._vbuf = kb, vb
        self._kbuf[:, :, self.length:end].copy_(key_states)
        self._vbuf[:, :, self.length:end].copy_(value_states)
        self._set_length(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self._set_length(max(0, self.length + tokens_to_remove))


def growing_cache(text_config: Any, workspace: torch.Tensor, length: int = 0) -> DynamicCache:
    """A DynamicCache whose layers live in ``workspace`` ``[2, layers, 1, kv_heads, capacity, head_dim]``,
    the first ``length`` tokens already filled."""
    cache = DynamicCache(config=text_config)
    cache.layers = [GrowingLayer(workspace[0, i], workspace[1, i], length) for i in range(workspace.shape[1])]
    return cache
