"""Model geometries for generated checkpoints.

``tiny``      seconds on CPU: text 2x128 (4 heads, 2 KV heads, head_dim 32), vision 2x64; fp32.
``tiny-moe``  ``tiny`` with a 4-expert top-2 MoE MLP in every text layer (``qwen3_vl_moe``); fp32.
``bench-2b``  Qwen3-VL-2B per-layer geometry (text 2048 wide, 16 heads, 8 KV heads, head_dim 128,
              FFN 6144; vision 1024 wide, FFN 4096, 16 heads, 3 DeepStack layers) with 2 text layers
              and 4 vision layers and the small tokenizer's vocabulary; saved in bf16 like the real one.
              Per token, prefill cost per layer and KV bytes per layer match the real 2B model.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen3vl_ray.engine.tokenizer_builder import SPECIAL_TOKEN_IDS, TOKENIZER_SIZE
from qwen3vl_ray.errors import ConfigError

# Embedding rows padded to a multiple of 128 above the tokenizer, as Qwen pads 151,665 -> 151,936.
VOCAB_SIZE = -(-TOKENIZER_SIZE // 128) * 128


@dataclass(frozen=True)
class Preset:
    """One generated-checkpoint geometry plus its processor limits."""

    text: dict
    """Qwen3VLTextConfig (or MoE text config) fields."""
    vision: dict
    """Qwen3VLVisionConfig fields."""
    dtype: str = "float32"
    """dtype the weights are saved in (config.dtype)."""
    moe: bool = False
    """True -> model_type qwen3_vl_moe (Qwen3VLMoeForConditionalGeneration)."""
    tie_word_embeddings: bool = False
    """Share the input embedding with lm_head (the real 2B/4B do)."""
    min_pixels: int = 32 * 32
    """Image processor size.shortest_edge (pixels): smaller images are upscaled to at least this."""
    max_pixels: int = 1024 * 1024
    """Image processor size.longest_edge (pixels): larger images are downscaled to at most this."""


def _text(hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int, max_positions: int,
          mrope_section: list[int]) -> dict:
    """Qwen3VLTextConfig fields of a 2-layer model over the padded vocabulary, with Qwen3-VL's interleaved
    M-RoPE (theta 5e6) split over ``mrope_section`` (its parts sum to ``head_dim // 2``)."""
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": mrope_section,
                         "mrope_interleaved": True},
    )


def _vision(depth: int, hidden: int, ffn: int, heads: int, out_hidden: int, positions: int,
            deepstack: list[int]) -> dict:
    """Qwen3VLVisionConfig fields with Qwen3-VL's patching: 16x16 patches, 2 frames, 2x2 merged per token."""
    return dict(
        depth=depth, hidden_size=hidden, intermediate_size=ffn, num_heads=heads, out_hidden_size=out_hidden,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=positions,
        deepstack_visual_indexes=deepstack,
    )


_TINY_TEXT = _text(hidden=128, ffn=256, heads=4, kv_heads=2, head_dim=32, max_positions=32768,
                   mrope_section=[6, 5, 5])
_TINY_VISION = _vision(depth=2, hidden=64, ffn=128, heads=2, out_hidden=128, positions=64, deepstack=[0, 1])

PRESETS: dict[str, Preset] = {
    "tiny": Preset(text=_TINY_TEXT, vision=_TINY_VISION),
    "tiny-moe": Preset(
        text={**_TINY_TEXT, "moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2,
              "decoder_sparse_step": 1, "mlp_only_layers": []},
        vision=_TINY_VISION,
        moe=True,
    ),
    "bench-2b": Preset(
        text=_text(hidden=2048, ffn=6144, heads=16, kv_heads=8, head_dim=128, max_positions=262144,
                   mrope_section=[24, 20, 20]),
        # the real 2B has 24 vision layers and takes DeepStack features from [5, 11, 17]
        vision=_vision(depth=4, hidden=1024, ffn=4096, heads=16, out_hidden=2048, positions=2304,
                       deepstack=[1, 2, 3]),
        dtype="bfloat16",
        tie_word_embeddings=True,
        min_pixels=65536,  # Qwen3-VL's shipped limits: 256x256 .. 4096x4096 pixels
        max_pixels=16777216,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ConfigError naming the allowed ones otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown checkpoint preset {name!r}; allowed: {sorted(PRESETS)}") from None


def preset_config(name: str):
    """A real ``Qwen3VLConfig`` (or ``Qwen3VLMoeConfig``) for preset ``name``; builds no weights."""
    p = get_preset(name)
    if p.moe:
        from transformers import Qwen3VLMoeConfig as Config
    else:
        from transformers import Qwen3VLConfig as Config
    cfg = Config(
        text_config=dict(p.text, dtype=p.dtype, pad_token_id=SPECIAL_TOKEN_IDS["<|endoftext|>"],
                         eos_token_id=SPECIAL_TOKEN_IDS["<|im_end|>"]),
        vision_config=dict(p.vision),
        image_token_id=SPECIAL_TOKEN_IDS["<|image_pad|>"],
        video_token_id=SPECIAL_TOKEN_IDS["<|video_pad|>"],
        vision_start_token_id=SPECIAL_TOKEN_IDS["<|vision_start|>"],
        vision_end_token_id=SPECIAL_TOKEN_IDS["<|vision_end|>"],
        tie_word_embeddings=p.tie_word_embeddings,
    )
    cfg.dtype = p.dtype
    return cfg
