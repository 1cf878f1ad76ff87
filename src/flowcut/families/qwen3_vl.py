"""Qwen3-VL (dense and MoE): Qwen2-VL's two stages, plus DeepStack; Qwen3.5: the encoder stage alone.

The tower is Qwen2-VL's packed tower without windows, with a learned position grid resampled to
each image (added before the first block, as the stock tower does) and **DeepStack**: the outputs
of three intermediate blocks, each through its own merger, are added to the visual tokens after
the first decoder layers. The mapping of the paper's method is Qwen2-VL's (SPEC §4): no CLS, so the
global token scores; a unit is a 2×2 merge group; FlowCut keeps ``2T`` groups in the encoder and
``T`` after decoder layer 1. DeepStack is kept consistent with both stages:

- Encoder stage: each kept unit's DeepStack features are its own state after each DeepStack block
  through that block's merger — every unit kept at the end is alive there, whatever was pruned
  before (:meth:`QwenVisionAdapter.deepstack`). Tokens that merge several units (VisionZip's
  contextual tokens, ``pool`` cells) take the features of the unit they stand at.
- Language-model stage: the DeepStack additions of the decoder layers at and after the pruning
  layer go to the kept tokens only (:meth:`DecoderPruner.visual_rows`), through the instance's
  ``language_model._deepstack_process``; adding before or after dropping the other tokens is the
  same for the kept ones.

Qwen3.5 has the same tower without DeepStack, and a hybrid language model whose decoder layers
0–2 are Gated DeltaNet (linear attention) layers and every fourth layer full attention. Layer 1
has no attention matrix whose last-token row could score visual tokens (SPEC §3), so the
language-model stage does not apply there: every encoder method keeps ``T`` in the encoder, as in
``stages="encoder"`` on the other families, and FastV is refused.

Videos as in Qwen2-VL (``keep`` per video, each temporal slice its share, pruned as a one-slice
image), with one difference in the prompt: the processor writes a timestamp before each slice, so a
video is one run of placeholders per slice. The processor writes each run's pruned count, and the
positions are expanded run by run (each slice's kept tokens keep their unpruned (t, h, w) positions;
the timestamps keep theirs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
)

from flowcut import compat
from flowcut.families.qwen import QwenFamily
from flowcut.runtime.family import Handler


class Qwen3VLFamily(QwenFamily):
    """Installs FlowCut on one Qwen3-VL instance (dense or MoE) and removes it again."""

    model_classes = (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)
    family_name = "Qwen3-VL"
    timestamped_videos = True

    def entry_points(self) -> dict[str, Handler]:
        entries = super().entry_points()
        if self.pruner is not None:
            entries[f"language_model.{compat.DEEPSTACK_ADD}"] = self.deepstack_add
        return entries

    def deepstack_add(
        self,
        stock: Callable[..., torch.Tensor],
        hidden_states: torch.Tensor,
        visual_pos_masks: torch.Tensor,
        visual_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """DeepStack's addition after one decoder layer, to the visual tokens that layer holds."""
        visual, rows = self.pruner.visual_rows(visual_pos_masks, visual_embeds, hidden_states.shape[1])
        return stock(hidden_states, visual, rows)


class Qwen3_5Family(Qwen3VLFamily):
    """Installs FlowCut on one Qwen3.5 instance (dense or MoE): the encoder stage alone."""

    model_classes = (Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration)
    family_name = "Qwen3.5"
    encoder_only_reason = (
        "Qwen3.5's decoder layer 1 is a Gated DeltaNet (linear attention) layer with no attention to score visual "
        "tokens by, so the encoder stage prunes alone"
    )
