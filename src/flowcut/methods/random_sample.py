"""The floor: a seeded uniform sample of patches (or units) at the feature layer."""

from __future__ import annotations

import zlib

import torch

from flowcut.core.encoder_stage import EncoderStageOutput
from flowcut.methods import (
    EncoderCall,
    Method,
    MethodOutput,
    UnitCall,
    kept_patches_output,
    kept_units_output,
    register,
    run_to_feature_layer,
    run_units_to_feature_layer,
)


def random_patches(
    image: torch.Tensor, num_patches: int, keep: int, seed: int, candidates: torch.Tensor | None = None
) -> torch.Tensor:
    """A uniform sample of ``keep`` patch indices (ascending), seeded by ``seed`` and the image's own pixels.

    The pixels enter the seed so that different images get different samples while one image gets
    the same sample alone or in any batch. ``candidates`` (ascending indices) restricts the sample:
    the first ``keep`` of them in the seeded permutation of all ``num_patches``, so an image with
    every patch a candidate gets the unrestricted sample.
    """
    # The generator keeps 32 bits of its seed, so the seed enters as the checksum's start value.
    image_seed = zlib.crc32(image.detach().float().cpu().contiguous().numpy().tobytes(), seed % 2**32)
    generator = torch.Generator().manual_seed(image_seed)
    order = torch.randperm(num_patches, generator=generator)
    if candidates is not None:
        allowed = torch.zeros(num_patches, dtype=torch.bool)
        allowed[candidates] = True
        order = order[allowed[order]]
    return order[:keep].sort().values


@register
class RandomSample(Method):
    name = "random"
    summary = "seeded uniform sample of patches (per image, batch-invariant), positional order"

    def run(self, call: EncoderCall) -> MethodOutput:
        hidden_states, _ = run_to_feature_layer(call)
        kept = [
            random_patches(image, call.num_patches, call.config.keep, call.config.seed) for image in call.pixel_values
        ]
        return kept_patches_output(call, hidden_states, kept)

    def select_units(self, call: UnitCall) -> EncoderStageOutput:
        """Each row's sample among its candidate units, seeded by the row's own pixels."""
        hidden_states, _, _ = run_units_to_feature_layer(call)
        kept = [
            random_patches(call.row_pixels(row), call.unit_count(row), keep, call.config.seed, call.candidates(row))
            for row, keep in enumerate(call.keeps)
        ]
        return kept_units_output(call, hidden_states, kept)
