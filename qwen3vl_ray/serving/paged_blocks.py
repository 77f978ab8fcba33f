"""Whole blocks in and out of vLLM's paged KV.

vLLM's worker registers one tensor per attention layer; the block index is one of its dimensions (the first
on CPU, ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``; the second in some GPU layouts, after a K/V
split). A stored block is one tensor ``[num_layers, *per-layer block shape]``: every layer of one block
together, so one key finds all of it and one lookup decides a hit for the whole model.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from qwen3vl_ray.errors import ConfigError


class PagedBlocks:
    """Gathers blocks out of, and scatters them into, the per-layer paged tensors of one vLLM worker."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int) -> None:
        if not kv_caches:
            raise ConfigError("vLLM registered no KV cache tensors")
        self.layer_names = list(kv_caches)
        self.tensors = [kv_caches[n] for n in self.layer_names]
        first = self.tensors[0]
        for name, t in zip(self.layer_names, self.tensors):
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ConfigError(f"layer {name} has KV {tuple(t.shape)} {t.dtype}, layer {self.layer_names[0]} "
                                  f"{tuple(first.shape)} {first.dtype}: one block entry needs every layer alike")
        dims = [d for d, size in enumerate(first.shape) if size == num_blocks]
        if not dims:
            raise ConfigError(f"no dimension of the KV tensor {tuple(first.shape)} has the {num_blocks} blocks "
                              f"vLLM allocated")
        self.block_dim = dims[0]
        self.num_blocks = num_blocks
        block_shape = list(first.shape)
        del block_shape[self.block_dim]
        self.entry_shape = (len(self.tensors), *block_shape)
        self.dtype = first.dtype

    @property
    def entry_nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.entry_shape:
            n *= s
        return n

    def gather(self, block_ids: Sequence[int]) -> list[torch.Tensor]:
        """One ``entry_shape`` tensor (on the CPU) per block id, in order."""
        if not block_ids:
            return []
        self._check_ids(block_ids)
        idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.tensors[0].device)
        # [n, L, ...]: each layer's rows for these blocks, then one row per block holding every layer
        rows = torch.stack([t.index_select(self.block_dim, idx).movedim(self.block_dim, 0) for t in self.tensors], 1)
        return list(rows.cpu().unbind(0))

    def fits(self, entry: torch.Tensor) -> bool:
        return tuple(entry.shape) == self.entry_shape and entry.dtype == self.dtype

    def scatter(self, block_id: int, entry: torch.Tensor) -> None:
        """Write one stored block into vLLM's block ``block_id`` of every layer."""
        self._check_ids([block_id])
        if not self.fits(entry):
            raise ValueError(f"block entry {tuple(entry.shape)} {entry.dtype} does not match the paged layout "
                             f"{self.entry_shape} {self.dtype}")
        entry = entry.to(self.tensors[0].device, non_blocking=True)
        for layer, t in enumerate(self.tensors):
            t.select(self.block_dim, block_id).copy_(entry[layer])

    def _check_ids(self, block_ids: Sequence[int]) -> None:
        bad = [b for b in block_ids if not 0 <= int(b) < self.num_blocks]
        if bad:
            raise IndexError(f"block id(s) {bad[:5]} outside vLLM's {self.num_blocks} blocks")
