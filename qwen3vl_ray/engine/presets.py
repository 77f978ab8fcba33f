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


_TINY_TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=32768,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [6, 5, 5],
                     "mrope_interleaved": True},
)
_TINY_VISION = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=2,
    out_hidden_size=128,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=64,
    deepstack_visual_indexes=[0, 1],
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(text=_TINY_TEXT, vision=_TINY_VISION),
    "tiny-moe": Preset(
        text={**_TINY_TEXT, "moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2,
              "decoder_sparse_step": 1, "mlp_only_layers": []},
        vision=_TINY_VISION,
        moe=True,
    ),
    "bench-2b": Preset(
        text=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=2,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=262144,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True},
        ),
        vision=dict(
            depth=4,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[1, 2, 3],  # the real 2B uses [5, 11, 17] of 24 layers
        ),
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
