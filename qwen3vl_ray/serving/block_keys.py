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
from typing import Any, Mapping, Sequence

from qwen3vl_ray.keys import CacheKey, Namespace, content_key

BLOCK_KIND = "vllm-block"
#: how a stored block lays out its tensor (``paged_blocks``); 2: keys and values apart in vLLM's CPU layout
ENTRY_FORMAT = 2


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
        return (f"vllm-{self.engine}:{self.platform}:entry{ENTRY_FORMAT}:L{self.num_layers}xH{self.num_kv_heads}"
                f"xD{self.head_size}:B{self.block_size}")


    @classmethod
    def from_text_config(cls, text: Mapping[str, Any], block_size: int, dtype: str, platform: str,
                         engine: str) -> "KVLayout":
        """The layout vLLM gives a model, from its (text) ``config.json`` alone: one attention layer per text
        layer, the KV heads of one worker (no tensor parallelism), the model dtype (``kv_cache_dtype="auto"``).
        For callers that key blocks without an engine (the request router)."""
        head_size = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        return cls(num_layers=text["num_hidden_layers"], num_kv_heads=text["num_key_value_heads"],
                   head_size=head_size, block_size=block_size, dtype=dtype, platform=platform, engine=engine)


def codec_tag(host_codec: str, disk_codec: str) -> str:
    """The namespace's codec field: a change of either codec must not serve old payloads as new."""
    return f"host={host_codec},disk={disk_codec}"


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
