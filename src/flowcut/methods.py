"""Encoder-side selection methods behind :func:`flowcut.apply`: which patches of each image survive.

Every model family calls :func:`run_encoder_method` with its :class:`VisionEncoderAdapter`; the
methods themselves know nothing about model families.
"""

from __future__ import annotations

import zlib

import torch

from flowcut.config import FlowCutConfig
from flowcut.core.encoder_stage import (
    EncoderStageOutput,
    EncoderStageSettings,
    VisionEncoderAdapter,
    run_encoder_stage,
    run_encoder_then_select,
)


def random_patches(image: torch.Tensor, num_patches: int, keep: int, seed: int) -> torch.Tensor:
    """A uniform sample of ``keep`` patch indices, seeded by ``seed`` and the image's own pixels.

    The pixels enter the seed so that different images get different samples while one image gets
    the same sample alone or in any batch.
    """
    # The generator keeps 32 bits of its seed, so the seed enters as the checksum's start value.
    image_seed = zlib.crc32(image.detach().float().cpu().contiguous().numpy().tobytes(), seed % 2**32)
    generator = torch.Generator().manual_seed(image_seed)
    return torch.randperm(num_patches, generator=generator)[:keep]


def run_encoder_method(
    config: FlowCutConfig, adapter: VisionEncoderAdapter, pixel_values: torch.Tensor, feature_layer: int
) -> EncoderStageOutput:
    """Run ``config.method`` on one batch of images up to the feature layer."""
    if config.method == "flowcut":
        settings = EncoderStageSettings(
            keep=config.keep,
            feature_layer=feature_layer,
            prune_interval=config.prune_interval,
            ema_weight=config.ema_weight,
            record_scores=config.record_scores,
            one_shot=config.schedule == "one_shot",
        )
        return run_encoder_stage(adapter, pixel_values, settings)
    if config.method == "random":
        return run_encoder_then_select(
            adapter,
            pixel_values,
            feature_layer,
            lambda image, num_patches: random_patches(image, num_patches, config.keep, config.seed),
        )
    raise ValueError(f"method {config.method!r} has no encoder stage")
