"""The pruning trace: what the last forward pass kept, per image and per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowcut.core.encoder_stage import ImageTrace


@dataclass
class PruningTrace:
    """Everything tools need to inspect one pruned forward pass (``handle.last_trace``)."""

    images: list[ImageTrace]
    grid_size: tuple[int, int]
    """Patch grid (rows, columns) the kept indices refer to (row-major, CLS excluded)."""
    keep: int | float
    """The budget per image (a ratio where the configuration gave one)."""
    feature_layer: int
    """Encoder layer whose output fed the projector; layers after it did not run."""
    language_positions: torch.Tensor | None = None
    """Language-model pruning only: ``(B, L')`` prompt positions the layers after the pruning layer kept."""
    image_tokens: list[tuple[int, int, int]] | None = None
    """Two-stage model families: per image, its visual tokens in the unpruned model, those entering the
    language model (the layers up to the pruning layer see them) and those the later layers see."""
    scoring_ms: float | None = None
    """With ``time_scoring``: milliseconds FlowCut's encoder stage spent scoring and selecting."""
    image_grids: list[tuple[int, int]] | None = None
    """Per image, its grid (rows, columns) when images differ in size (Qwen2-VL: the merged grid)."""
    videos: list[list[ImageTrace]] | None = None
    """Per video of the pass, per frame: what the encoder stage kept (frames as images of ``grid_size``, or of
    ``video_grids``)."""
    video_keep: int | float | None = None
    """The budget per video (a ratio where the configuration gave one)."""
    video_tokens: list[tuple[int, int, int]] | None = None
    """Two-stage model families: per video, as ``image_tokens`` for images."""
    video_grids: list[tuple[int, int]] | None = None
    """Per video, the grid (rows, columns) of one frame where it differs from ``grid_size`` (Qwen2-VL: merged)."""

    @property
    def num_patches(self) -> int:
        """Patches per image before pruning."""
        return self.grid_size[0] * self.grid_size[1]

    @property
    def kept_indices(self) -> list[torch.Tensor]:
        """Per image, the kept patch indices in ascending order."""
        return [image.kept_indices for image in self.images]

    @property
    def tokens_per_layer(self) -> list[list[int]]:
        """Per image, the patch tokens each executed encoder layer processed."""
        return [image.tokens_per_layer for image in self.images]
