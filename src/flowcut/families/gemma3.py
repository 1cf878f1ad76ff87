"""Gemma 3 (``Gemma3ForConditionalGeneration``: a SigLIP tower without CLS, average pooling to 256 tokens).

How the paper's method maps onto it. Every image is one fixed-size view (64×64 patches at 896
pixels), and the projector averages each square of 4×4 patches, a *pooling cell*, into one of the
image's 256 tokens. A token budget is therefore a number of cells, and the encoder stage prunes
whole cells: a unit is one cell, its state its patches' states side by side, so the pooling still
averages a kept cell's own real neighbours and every kept cell is one token. The tower has no CLS:
the global token scores the patches (SPEC §4); a cell's relation is the attention its patches
receive together, its density their mean value norm. Kept cells reach the language model in
row-major order, as the stock model orders its tokens. Pan-and-scan crops are images of their
own (256 tokens each): each keeps ``keep`` cells.

One stage. As for LLaVA-1.5 (a fixed, small number of tokens per image) the encoder keeps ``keep``
cells and the language model is not pruned; every encoder method (FlowCut, VisionZip, DivPrune,
VisPruner, HiPrune, pool, random) selects cells. ``keep`` at or above 256 runs the stock tower, bit for bit. Everything
but the declaration is :class:`~flowcut.families.views.FixedViewFamily`.
"""

from __future__ import annotations

import torch
from transformers import Gemma3ForConditionalGeneration

from flowcut import compat
from flowcut.families.clip import GroupedPatchAdapter, SiglipEncoderAdapter
from flowcut.families.views import FixedViewFamily


class Gemma3Family(FixedViewFamily):
    """Installs FlowCut on one ``Gemma3ForConditionalGeneration`` instance and removes it again."""

    model_classes = (Gemma3ForConditionalGeneration,)
    family_name = "Gemma 3"
    encoder_only_reason = (
        "Gemma 3 makes a fixed number of tokens per image (256) and is pruned in the vision encoder alone, as "
        "LLaVA-1.5 is; its decoder attends bidirectionally within each image and mixes sliding-window layers"
    )

    def grouped_tower(self) -> GroupedPatchAdapter:
        side = compat.pooling_cell_side(self.base.multi_modal_projector)
        return GroupedPatchAdapter(SiglipEncoderAdapter(self.base.vision_tower), side)

    def tokens_per_view(self) -> int:
        return self.model.config.mm_tokens_per_image

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """As the stock model makes a cell's token from its patches: the tower's final norm per patch, the
        cell's mean (the average pooling), the projector's norm and matrix."""
        patches = compat.siglip_post_layernorm(self.base.vision_tower)(self.encoder.cell_patches(hidden_states))
        return compat.project_pooled_cells(self.base.multi_modal_projector, patches.mean(dim=2))
