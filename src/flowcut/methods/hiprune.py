"""HiPrune (arXiv 2508.00553): anchors from an object-centric middle layer, their neighbours, and registers
from the output layer, by the attention each unit receives.

With a budget of ``T`` tokens, ``α = anchor_share`` and the object layer ``l`` (``object_layer``, 1-based):

1. **Anchors**: the ``round(α·T / 5)`` units that receive the most attention at layer ``l`` (averaged
   over heads and over every query token: a column mean of the attention matrix; no CLS needed).
2. **Buffers**: each anchor's four spatial neighbours (up, down, left, right) inside the unit grid.
3. **Registers**: the rest of ``T``, the units that receive the most attention at the feature layer,
   anchors and buffers excluded.

The kept units reach the language model in positional order. The paper's defaults for LLaVA-1.5
are ``α = 0.1`` and ``l = 9`` (of CLIP's 24 layers); other towers default to ``round(9/24 · depth)``
(the authors use ``l = 16`` for Qwen2.5-VL's 32 blocks: ``object_layer=16``). Where the authors' code
and paper differ: the code takes a left/right neighbour of an anchor at a row's end from the
next/previous row and clamps at the grid's ends; we follow the paper (spatially adjacent units only).
"""

from __future__ import annotations

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
    run_recording,
)


def neighbours(units: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The up, down, left and right neighbours inside a row-major ``grid`` of each of ``units``."""
    rows, columns = grid
    row, column = units // columns, units % columns
    steps = ((row > 0, -columns), (row < rows - 1, columns), (column > 0, -1), (column < columns - 1, 1))
    return torch.cat([units[inside] + step for inside, step in steps])


def hiprune_units(
    object_attention: torch.Tensor,
    output_attention: torch.Tensor,
    grid: tuple[int, int],
    keep: int,
    anchor_share: float,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """HiPrune's choice of ``keep`` units of a ``grid`` (ascending), from what each unit receives at the two layers.

    ``candidates`` (ascending) restricts every choice to the units that may survive (LLaVA-NeXT's unpadded ones).
    """
    units = object_attention.shape[0]
    allowed = torch.ones(units, dtype=torch.bool, device=object_attention.device)
    if candidates is not None:
        allowed = torch.zeros_like(allowed)
        allowed[candidates] = True
    anchors = round(keep * anchor_share / 5)
    by_object = object_attention.masked_fill(~allowed, float("-inf")).argsort(descending=True, stable=True)
    anchor_units = by_object[: min(anchors, int(allowed.sum()))]
    chosen = torch.zeros_like(allowed)
    chosen[anchor_units] = True
    chosen[neighbours(anchor_units, grid)] = True
    chosen &= allowed
    if int(chosen.sum()) > keep:  # a share so large its buffers overflow: the most attended of them stay
        ranked = by_object[chosen[by_object]]
        chosen = torch.zeros_like(allowed)
        chosen[ranked[:keep]] = True
    registers = output_attention.masked_fill(chosen | ~allowed, float("-inf"))
    chosen[registers.argsort(descending=True, stable=True)[: keep - int(chosen.sum())]] = True
    return chosen.nonzero().squeeze(1)


@register
class HiPrune(Method):
    name = "hiprune"
    summary = "HiPrune (arXiv 2508.00553): anchors by middle-layer attention, their neighbours, registers by the last"
    settings = frozenset({"anchor_share", "object_layer"})

    @staticmethod
    def object_layer(config: object, encoder: object, feature_layer: int) -> int:
        """The 0-based object layer (default: 9 of 24 scaled to the tower's depth); it must run before the features."""
        chosen = config.object_layer or max(1, round(9 / 24 * encoder.num_layers))
        if not 1 <= chosen <= feature_layer:
            raise ValueError(f"object_layer={chosen} must be a layer before the feature layer ({feature_layer + 1})")
        return chosen - 1

    def run(self, call: EncoderCall) -> MethodOutput:
        layer = self.object_layer(call.config, call.encoder, call.feature_layer)
        hidden_states, _, records = run_recording(call, (layer, call.feature_layer))
        object_attention = call.encoder.received_attention(records[layer], None)
        output_attention = call.encoder.received_attention(records[call.feature_layer], None)
        kept = [
            hiprune_units(first, last, call.grid_size, call.config.keep, call.config.anchor_share).cpu()
            for first, last in zip(object_attention, output_attention, strict=True)
        ]
        return kept_patches_output(call, hidden_states, kept)

    def select_units(self, call: UnitCall) -> EncoderStageOutput:
        """Per row (crop, frame, image), HiPrune over its unit grid among its candidates."""
        layer = self.object_layer(call.config, call.encoder, call.feature_layer)
        hidden_states, alive, records = run_recording(call, (layer, call.feature_layer))
        object_attention = call.encoder.received_attention(records[layer], alive)
        output_attention = call.encoder.received_attention(records[call.feature_layer], alive)
        kept = []
        for row, keep in enumerate(call.keeps):
            count = call.unit_count(row)
            chosen = hiprune_units(
                object_attention[row, :count],
                output_attention[row, :count],
                call.unit_grid(row),
                keep,
                call.config.anchor_share,
                call.candidates(row).to(hidden_states.device),
            )
            kept.append(chosen.cpu())
        return kept_units_output(call, hidden_states, kept)
