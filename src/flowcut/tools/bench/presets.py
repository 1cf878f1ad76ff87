"""Random-weight models at the real shapes of published VLMs, for speed measurements without a download.

Speed depends on shapes, not on weights: a preset builds the architecture with random weights and
an offline processor, so ``flowcut bench --preset llava-1.5-7b`` measures what pruning buys at
LLaVA-1.5-7B's sizes on any machine. ``text_layers`` caps the language model's depth so a CPU run
finishes in minutes (every decoder layer costs the same, so per-layer ratios carry over);
``smoke`` divides every width by 16 for a seconds-long check of the whole path (CI).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, ProcessorMixin

from flowcut.testing import (
    build_tiny_gemma3,
    build_tiny_internvl,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_qwen,
    build_tiny_video_llava,
)


@dataclass(frozen=True)
class Preset:
    """The published shapes of one model."""

    summary: str
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int
    frames: int = 0
    """Frames per video of a video model (Video-LLaVA); 0 for image models."""
    family: str = "llava"
    """The architecture the shapes describe, by its transformers model type: ``llava``, ``video_llava``,
    ``llava_next``, ``qwen2_vl``, ``qwen3_vl``, ``gemma3`` or ``internvl``."""
    deepstack_layers: tuple[int, ...] = ()
    """Qwen3-VL: the vision blocks DeepStack feeds to the first decoder layers."""
    position_grid: int = 0
    """Qwen3-VL: the side of the learned position grid."""
    text_head_dim: int | None = None
    """Width of one attention head where it is not ``text_hidden / text_heads`` (Gemma 3)."""
    pooled_tokens: int = 0
    """Gemma 3: the tokens its projector pools each image into."""
    picture_size: int | None = None
    """Side of the default square picture the benchmark asks about (None: the shapes-VQA picture as it is,
    336 px). LLaVA-NeXT's 672-px picture is a 2×2 grid of crops plus the base view; Qwen2-VL's token count
    follows the picture (672 px: 576 tokens, LLaVA-1.5's count)."""


CLIP_VIT_L_14 = {"patch_size": 14, "vision_hidden": 1024, "vision_intermediate": 4096, "vision_layers": 24}
CLIP_VIT_L_14["vision_heads"] = 16
VICUNA_7B = {"text_hidden": 4096, "text_intermediate": 11008, "text_layers": 32, "text_heads": 32}
VICUNA_7B.update(text_kv_heads=32, vocab_size=32064)

PRESETS = {
    "llava-1.5-7b": Preset(
        "LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, 576 patches) + a 32-layer, 4096-wide Llama (Vicuna-7B)",
        image_size=336,
        **CLIP_VIT_L_14,
        **VICUNA_7B,
    ),
    "video-llava-7b": Preset(
        "Video-LLaVA-7B: 8 frames through CLIP ViT-L/14-224 (24 layers, 256 patches each) + Vicuna-7B",
        image_size=224,
        frames=8,
        family="video_llava",
        **CLIP_VIT_L_14,
        **VICUNA_7B,
    ),
    "llava-next-7b": Preset(
        "LLaVA-NeXT-7B (Vicuna): a 672-px picture as 4 crops + the base view through CLIP ViT-L/14-336 "
        "(2,880 patches, 2,928 tokens with image newlines) + Vicuna-7B",
        image_size=336,
        family="llava_next",
        picture_size=672,
        **CLIP_VIT_L_14,
        **VICUNA_7B,
    ),
    "qwen2-vl-7b": Preset(
        "Qwen2-VL-7B: a 672-px picture through its 32-layer, 1280-wide ViT (2,304 patches, merged 2×2 into "
        "576 tokens) + a 28-layer, 3584-wide Qwen2 with 4 key-value heads",
        image_size=672,
        family="qwen2_vl",
        picture_size=672,
        patch_size=14,
        vision_hidden=1280,
        vision_intermediate=5120,
        vision_layers=32,
        vision_heads=16,
        text_hidden=3584,
        text_intermediate=18944,
        text_layers=28,
        text_heads=28,
        text_kv_heads=4,
        vocab_size=152064,
    ),
    "qwen3-vl-8b": Preset(
        "Qwen3-VL-8B: a 672-px picture through its 27-layer, 1152-wide ViT (1,764 patches of 16 px, merged 2×2 "
        "into 441 tokens; DeepStack from blocks 8, 16, 24) + a 36-layer, 4096-wide Qwen3 with 8 key-value heads",
        image_size=672,
        family="qwen3_vl",
        picture_size=672,
        patch_size=16,
        vision_hidden=1152,
        vision_intermediate=4304,
        vision_layers=27,
        vision_heads=16,
        text_hidden=4096,
        text_intermediate=12288,
        text_layers=36,
        text_heads=32,
        text_kv_heads=8,
        vocab_size=151936,
        deepstack_layers=(8, 16, 24),
        position_grid=48,
    ),
    "gemma-3-4b": Preset(
        "Gemma 3 4B: an 896-px image through SigLIP So400m (27 layers, 1152 wide, 4,096 patches of 14 px, "
        "averaged 4×4 into 256 tokens) + a 34-layer, 2560-wide Gemma 3 with 8 heads of 256 and 4 key-value heads",
        image_size=896,
        family="gemma3",
        patch_size=14,
        vision_hidden=1152,
        vision_intermediate=4304,
        vision_layers=27,
        vision_heads=16,
        text_hidden=2560,
        text_intermediate=10240,
        text_layers=34,
        text_heads=8,
        text_kv_heads=4,
        text_head_dim=256,
        vocab_size=262208,
        pooled_tokens=256,
    ),
    "internvl3-8b": Preset(
        "InternVL3-8B: an 896-px picture as 2×2 tiles of 448 px + a thumbnail through InternViT-300M (24 layers, "
        "1024 wide, 1,024 patches of 14 px and CLS per tile, pixel-shuffled 2×2 into 256 tokens: 1,280 in all) + a "
        "28-layer, 3584-wide Qwen2.5 with 4 key-value heads",
        image_size=448,
        family="internvl",
        picture_size=896,
        patch_size=14,
        vision_hidden=1024,
        vision_intermediate=4096,
        vision_layers=24,
        vision_heads=16,
        text_hidden=3584,
        text_intermediate=18944,
        text_layers=28,
        text_heads=28,
        text_kv_heads=4,
        vocab_size=151674,
    ),
}

SMOKE_DIVISOR = 16


def build_preset(
    name: str, text_layers: int | None = None, smoke: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The preset's architecture with random weights, and an offline processor for it."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    layers = preset.text_layers if text_layers is None else text_layers
    if not 2 <= layers <= preset.text_layers:
        raise ValueError(f"text_layers must be between 2 and {preset.text_layers} for {name}, got {layers}")
    divisor = SMOKE_DIVISOR if smoke else 1
    # Smoke widths keep 4 heads per tower, so every head stays at least 16 wide.
    vision_heads = 4 if smoke else preset.vision_heads
    text_heads, text_kv_heads = preset.text_heads, preset.text_kv_heads
    if smoke:
        text_heads, text_kv_heads = 4, min(4, text_kv_heads)
    vision_hidden = preset.vision_hidden // divisor
    if smoke:  # Qwen3-VL's 2-D rotary needs head widths divisible by 4 (1152 / 16 = 72 becomes 64)
        vision_hidden -= vision_hidden % (4 * vision_heads)
    options = {
        "seed": seed,
        "patch_size": preset.patch_size,
        "dtype": dtype,
        "vocab_size": preset.vocab_size,
        "vision_layers": preset.vision_layers,
        "vision_hidden": vision_hidden,
        "vision_intermediate": preset.vision_intermediate // divisor,
        "vision_heads": vision_heads,
        "text_layers": layers,
        "text_hidden": preset.text_hidden // divisor,
        "text_intermediate": preset.text_intermediate // divisor,
        "text_heads": text_heads,
        "text_kv_heads": text_kv_heads,
    }
    if preset.family == "qwen2_vl":  # image_size: the largest picture, in pixels per side
        return build_tiny_qwen("2", max_pixels=preset.image_size**2, **options)
    if preset.family == "qwen3_vl":
        deepstack = list(preset.deepstack_layers)
        grid = preset.position_grid
        return build_tiny_qwen(
            "3", max_pixels=preset.image_size**2, deepstack_layers=deepstack, position_grid=grid, **options
        )
    if preset.family == "gemma3":
        head_dim = preset.text_head_dim // divisor if preset.text_head_dim else None
        return build_tiny_gemma3(
            image_size=preset.image_size,
            tokens_per_image=preset.pooled_tokens,
            text_head_dim=head_dim,
            sliding_window=1024,
            **options,
        )
    if preset.family == "internvl":
        return build_tiny_internvl(image_size=preset.image_size, max_tiles=12, **options)
    builders = {"llava": build_tiny_llava, "video_llava": build_tiny_video_llava, "llava_next": build_tiny_llava_next}
    return builders[preset.family](image_size=preset.image_size, **options)
