"""Encoder-stage adapter for CLIP vision towers (``CLIPVisionModel``, CLS token at slot 0)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.models.clip import modeling_clip

from flowcut.adapters.attention import key_padding_mask, recording_attention, resolve_attention
from flowcut.core.encoder_stage import AttentionRecord, AttentionRecorder
from flowcut.core.scoring import CriteriaScores, cls_criteria


class ClipEncoderAdapter:
    """Runs a ``CLIPVisionModel`` layer by layer for the encoder stage."""

    query_slots = 1
    """CLS sits at slot 0 and scores the patches."""

    def __init__(self, vision_tower: modeling_clip.CLIPVisionModel) -> None:
        if not isinstance(vision_tower, modeling_clip.CLIPVisionModel):
            raise TypeError(
                "FlowCut's CLS-token encoder stage needs a CLIPVisionModel vision tower, "
                f"got {type(vision_tower).__name__}"
            )
        self.vision_tower = vision_tower
        self.embeddings = next(m for m in vision_tower.modules() if isinstance(m, modeling_clip.CLIPVisionEmbeddings))
        self.layers = [m for m in vision_tower.modules() if isinstance(m, modeling_clip.CLIPEncoderLayer)]
        self.attention_configs = list(
            {id(layer.self_attn.config): layer.self_attn.config for layer in self.layers}.values()
        )
        self._attention = None
        self._implementation: str | None = None

    @property
    def num_layers(self) -> int:
        """Number of encoder layers."""
        return len(self.layers)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image at the configured image size."""
        return self.embeddings.num_patches

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns)."""
        side = self.embeddings.image_size // self.embeddings.patch_size
        return side, side

    @contextmanager
    def session(self) -> Iterator[ClipEncoderAdapter]:
        """Route the tower's attention through the recorder for one pass, then restore it."""
        self._implementation = self.attention_configs[0]._attn_implementation
        self._attention = resolve_attention(self._implementation, modeling_clip.eager_attention_forward)
        with recording_attention(self.attention_configs):
            try:
                yield self
            finally:
                self._attention = None

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + CLS embeddings after the pre-layer norm, as ``CLIPVisionModel.forward`` computes them."""
        return self.vision_tower.pre_layrnorm(self.embeddings(pixel_values))

    def run_layer(
        self,
        index: int,
        hidden_states: torch.Tensor,
        alive: torch.Tensor | None,
        recorder: AttentionRecorder | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run layer ``index`` with its own attention implementation, recording q/k/v when asked.

        CLIP's position embeddings were added at the input, so ``positions`` is not needed.
        """
        if self._attention is None:
            raise RuntimeError("run_layer must be called inside ClipEncoderAdapter.session()")
        mask = None if alive is None else key_padding_mask(alive, self._implementation, hidden_states.dtype)
        return self.layers[index](
            hidden_states,
            mask,
            flowcut_recorder=recorder,
            flowcut_attention=self._attention,
            flowcut_implementation=self._implementation,
        )

    def criteria(self, record: AttentionRecord, alive: torch.Tensor | None) -> CriteriaScores:
        """CLS-view criteria (SPEC §2 steps 1–3)."""
        return cls_criteria(record.query, record.key, record.value, record.scaling, alive)
