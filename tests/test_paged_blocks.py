"""Blocks between vLLM's paged KV tensors and stored entries (``qwen3vl_ray.serving.paged_blocks``), without vLLM:
the tensors are laid out as vLLM's CPU and GPU backends lay them out."""

from __future__ import annotations

import pytest
import torch

from qwen3vl_ray.codecs.base import make_codec
from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.serving.paged_blocks import PagedBlocks

LAYERS, BLOCKS, HEADS, TOKENS, HEAD = 3, 10, 2, 32, 16


def cpu_layout() -> dict[str, torch.Tensor]:
    """vLLM's CPU layout: per layer [num_blocks, kv_heads, block_size, K|V]."""
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.attn": torch.randn(BLOCKS, HEADS, TOKENS, 2 * HEAD, generator=g) for i in range(LAYERS)}


def test_cpu_layout_entries_hold_keys_and_values_apart_and_round_trip():
    kv = cpu_layout()
    paged = PagedBlocks(kv, BLOCKS, head_size=HEAD)
    assert paged.split_kv and paged.entry_shape == (LAYERS, 2, HEADS, TOKENS, HEAD)
    [e3, e7] = [e.clone() for e in paged.gather([3, 7])]
    for layer, t in enumerate(kv.values()):
        assert torch.equal(e3[layer, 0], t[3, :, :, :HEAD])  # keys
        assert torch.equal(e3[layer, 1], t[3, :, :, HEAD:])  # values
    fresh = {name: torch.zeros_like(t) for name, t in kv.items()}
    target = PagedBlocks(fresh, BLOCKS, head_size=HEAD)
    target.scatter(5, e3)
    target.scatter(0, e7)
    for name in kv:
        assert torch.equal(fresh[name][5], kv[name][3]) and torch.equal(fresh[name][0], kv[name][7])
        assert not fresh[name][1:5].any() and not fresh[name][6:].any()  # no other block touched


def test_gathered_entries_are_views_of_one_reused_buffer():
    paged = PagedBlocks(cpu_layout(), BLOCKS, head_size=HEAD)
    first = paged.gather([1, 2])
    kept = first[0].clone()
    second = paged.gather([4])
    assert second[0].data_ptr() == first[0].data_ptr()  # reused: no fresh pages per save
    assert not torch.equal(first[0], kept)  # which is why callers store (copy) before the next gather


def test_kv_codecs_take_cpu_layout_entries():
    """kv-int8 groups keys per channel and values per token: it needs [..., 2, heads, tokens, head_size]."""
    paged = PagedBlocks(cpu_layout(), BLOCKS, head_size=HEAD)
    [entry] = paged.gather([6])
    codec = make_codec("kv-int8")
    back = codec.decode(codec.encode(entry))
    assert back.shape == entry.shape
    cos = torch.nn.functional.cosine_similarity(back.flatten().float(), entry.flatten().float(), dim=0)
    assert cos > 0.999


def test_other_layouts_keep_vllms_block_shape():
    """A GPU-style layout [2, num_blocks, tokens, heads, head_size]: the block dimension is found, and the entry is
    the layer's block as vLLM holds it."""
    kv = {f"l{i}": torch.randn(2, BLOCKS, TOKENS, HEADS, HEAD) for i in range(LAYERS)}
    paged = PagedBlocks(kv, BLOCKS, head_size=HEAD)
    assert not paged.split_kv and paged.block_dim == 1
    assert paged.entry_shape == (LAYERS, 2, TOKENS, HEADS, HEAD)
    [entry] = [e.clone() for e in paged.gather([9])]
    fresh = {n: torch.zeros_like(t) for n, t in kv.items()}
    PagedBlocks(fresh, BLOCKS, head_size=HEAD).scatter(2, entry)
    for n in kv:
        assert torch.equal(fresh[n][:, 2], kv[n][:, 9])


def test_bad_block_ids_and_mismatched_entries_are_refused():
    paged = PagedBlocks(cpu_layout(), BLOCKS, head_size=HEAD)
    with pytest.raises(IndexError, match="outside"):
        paged.gather([BLOCKS])
    with pytest.raises(ValueError, match="does not match"):
        paged.scatter(0, torch.zeros(LAYERS, 2, HEADS, TOKENS, HEAD + 1))
    assert not paged.fits(torch.zeros(paged.entry_shape, dtype=torch.float16))
    with pytest.raises(ConfigError, match="blocks"):
        PagedBlocks(cpu_layout(), BLOCKS + 1)
    with pytest.raises(ConfigError, match="alike"):
        PagedBlocks({"a": torch.zeros(BLOCKS, 2, 4, 8), "b": torch.zeros(BLOCKS, 2, 4, 6)}, BLOCKS)
