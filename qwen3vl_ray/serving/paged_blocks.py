"""Whole blocks in and out of vLLM's paged KV.

vLLM's worker registers one tensor per attention layer; the block index is one of its dimensions (the first
on CPU, ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, keys and values side by side in the last
dimension; the second in some GPU layouts, after a K/V split). A stored block is one tensor holding every layer
of one block, so one key finds all of it and one lookup decides a hit for the whole model:

- in the CPU layout, ``[num_layers, 2, num_kv_heads, block_size, head_size]``: keys and values apart, the
  layout the KV codecs (``kv-int8``, ``kv-int4``: keys per channel, values per token) work on;
- in any other layout, ``[num_layers, *per-layer block shape]`` as vLLM holds it.

Gathers copy each (block, layer) once into a staging buffer the object keeps and reuses: a fresh tensor per
save would pay first-touch page faults on every byte (measured: several times the copy itself).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from qwen3vl_ray.errors import ConfigError


class PagedBlocks:
    """Gathers blocks out of, and scatters them into, the per-layer paged tensors of one vLLM worker.

    Args:
        kv_caches: vLLM's registered tensors, layer name -> tensor, in the model's layer order.
        num_blocks: the blocks vLLM allocated (finds the block dimension).
        head_size: the attention head size; when a layer's block is ``[heads, tokens, 2 * head_size]`` (vLLM's
            CPU layout), entries split keys from values (see the module docstring).
    """

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int, head_size: int | None = None) -> None:
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
        self.dtype = first.dtype
        # vLLM's CPU layout: [heads, tokens, K|V]; a block of it is contiguous, so it views as [heads, tokens, 2, D]
        self.split_kv = (head_size is not None and len(block_shape) == 3 and block_shape[2] == 2 * head_size
                         and first.select(self.block_dim, 0).is_contiguous())
        if self.split_kv:
            heads, tokens, _ = block_shape
            self._layer_entry = (2, heads, tokens, head_size)
        else:
            self._layer_entry = tuple(block_shape)
        self.entry_shape = (len(self.tensors), *self._layer_entry)
        self._staging: torch.Tensor | None = None

    @property
    def entry_nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.entry_shape:
            n *= s
        return n

    def _as_entry(self, block: torch.Tensor) -> torch.Tensor:
        """One layer's block, as the entry lays it out (a view: writing to it writes vLLM's block)."""
        if self.split_kv:
            heads, tokens, two_d = block.shape
            return block.view(heads, tokens, 2, two_d // 2).permute(2, 0, 1, 3)
        return block

    def gather(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One ``entry_shape`` tensor (on the CPU) per block id, in order: views of ``out`` (``[>= n,
        *entry_shape]``, the caller's), or else of this object's staging buffer, valid until the next ``gather``
        without ``out``: store (copy) them before that."""
        if not block_ids:
            return []
        self._check_ids(block_ids)
        n = len(block_ids)
        if out is not None:
            if out.shape[0] < n or tuple(out.shape[1:]) != self.entry_shape or out.dtype != self.dtype:
                raise ValueError(f"gather buffer {tuple(out.shape)} {out.dtype} cannot hold {n} entries of "
                                 f"{self.entry_shape} {self.dtype}")
        else:
            if self._staging is None or self._staging.shape[0] < n:
                self._staging = torch.empty((n, *self.entry_shape), dtype=self.dtype, device="cpu")
            out = self._staging
        out = out[:n]
        for i, b in enumerate(block_ids):
            for layer, t in enumerate(self.tensors):
                out[i, layer].copy_(self._as_entry(t.select(self.block_dim, int(b))))
        return list(out.unbind(0))

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
            self._as_entry(t.select(self.block_dim, block_id)).copy_(entry[layer])

    def _check_ids(self, block_ids: Sequence[int]) -> None:
        bad = [b for b in block_ids if not 0 <= int(b) < self.num_blocks]
        if bad:
            raise IndexError(f"block id(s) {bad[:5]} outside vLLM's {self.num_blocks} blocks")
