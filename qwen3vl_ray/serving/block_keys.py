"""Cache keys for vLLM's KV blocks.

vLLM names a full block by a chained hash: sha256 of the parent block's hash, the block's token ids and
extras, where blocks holding image tokens add ``("mm", mm_hash, offset)`` (``mm_hash`` hashes the decoded
pixels, so two images never share a block). What it leaves out is the model: two checkpoints give the same
first hash for the same text. A shared store therefore keys each block under a :class:`Namespace` carrying
the model fingerprint (config + weights), the KV dtype, the paged layout and the tenant, so blocks of another
model, dtype, layout or tenant are unrelated keys (and the tiers refuse cross-namespace reads besides).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from qwen3vl_ray.keys import CacheKey, Namespace, content_key

BLOCK_KIND = "vllm-block"


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The shape of what one block holds, as the scheduler and every worker see it (from vLLM's
    ``KVCacheConfig``, so both sides derive the same namespace without the tensors).

    Attributes:
        num_layers: attention layers whose KV a block entry carries, all of them.
        num_kv_heads: KV heads per layer (per tensor-parallel rank).
        head_size: per-head size.
        block_size: tokens per block.
        dtype: KV cache dtype, e.g. ``"float32"``, ``"bfloat16"``.
        platform: ``"cpu"`` or ``"cuda"``: the attention backends lay a block out differently.
        engine: the vLLM version; a new version may change the paged layout.
    """

    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: str
    platform: str
    engine: str

    @property
    def tag(self) -> str:
        return (f"vllm-{self.engine}:{self.platform}:L{self.num_layers}xH{self.num_kv_heads}xD{self.head_size}"
                f":B{self.block_size}")


def block_namespace(model_fingerprint: str, layout: KVLayout, codec: str, tenant: str) -> Namespace:
    """The namespace every block of one (model, layout, codec, tenant) is keyed under."""
    return Namespace(model=model_fingerprint, dtype=layout.dtype, layout=layout.tag, codec=codec, tenant=tenant)


def block_keys(namespace: Namespace, block_hashes: Sequence[bytes]) -> list[CacheKey]:
    """One key per vLLM block hash. vLLM's hashes already chain the prefix, so each key does too."""
    out = []
    for h in block_hashes:
        if not isinstance(h, (bytes, bytearray)):
            raise TypeError(f"vLLM block hash must be bytes, got {type(h).__name__}")
        out.append(content_key(namespace, BLOCK_KIND, bytes(h)))
    return out
