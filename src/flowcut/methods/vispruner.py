"""VisPruner (arXiv 2412.01818, ICCV 2025): important tokens by the vision tower's own attention, then diverse
tokens from the rest by removing near-duplicates.

At the feature layer (the layer whose output the projector reads), with a budget of ``T`` tokens:

1. **Important tokens**: the ``T_imp = ⌊r·T⌋`` units the query token attends to most (CLS, head-averaged;
   the global token on CLS-free towers, SPEC §4), ``r = important_ratio``.
2. **Diverse tokens**: the other units, in descending attention, are thinned until ``T − T_imp`` remain.
   Each step splits them alternately into two sets A and B, gives every A unit its largest cosine
   similarity to B (feature-layer states), and drops the ``min(8, excess)`` A units most similar to B.

The kept units reach the language model in positional order. ``keep`` is ``T``: unlike VisionZip,
VisPruner does not hand CLS to the language model. The authors' code and paper agree on these steps;
``important_ratio = 0.5`` is their default at every budget (their LLaVA-1.5 scripts).
"""

from __future__ import annotations

import torch

from flowcut.core.encoder_stage import EncoderStageOutput
from flowcut.core.scoring import row_attention
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

STEP = 8
"""Most near-duplicates one thinning step drops (the authors' value)."""


def remove_duplicates(states: torch.Tensor, order: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` of the candidates ``order`` (indices into ``states``, most attended first) that survive thinning.

    ``states`` ``(N, D)`` are unit-normalised. Each step: A = every other candidate from the first, B = the
    rest; the A candidates with the largest cosine similarity to any B candidate are dropped (at most
    ``STEP``, at most the excess over ``keep``); the surviving A candidates (most similar first, as the
    authors order them) then B are the next step's candidates.
    """
    if keep <= 0:
        return order[:0]
    candidates = order
    while len(candidates) > keep:  # more than keep >= 1 candidates: B is never empty
        step = min(STEP, len(candidates) - keep)
        first, second = candidates[0::2], candidates[1::2]
        similarity = (states[first] @ states[second].T).max(dim=1).values
        survivors = first[similarity.argsort(descending=True, stable=True)[step:]]
        candidates = torch.cat([survivors, second])
    return candidates


def vispruner_units(states: torch.Tensor, attention: torch.Tensor, keep: int, important_ratio: float) -> torch.Tensor:
    """VisPruner's choice of ``keep`` among ``N`` units (ascending indices).

    ``states`` ``(N, D)``: the feature layer's unit states; ``attention`` ``(N,)``: what the query token gives each.
    """
    important = int(keep * important_ratio)
    order = attention.argsort(descending=True, stable=True)
    normalised = torch.nn.functional.normalize(states.float(), dim=-1)
    diverse = remove_duplicates(normalised, order[important:], keep - important)
    return torch.cat([order[:important], diverse]).sort().values


@register
class VisPruner(Method):
    name = "vispruner"
    summary = "VisPruner (arXiv 2412.01818): important patches by CLS attention, diverse ones by removing duplicates"
    settings = frozenset({"important_ratio"})

    def run(self, call: EncoderCall) -> MethodOutput:
        hidden_states, record = run_to_feature_layer(call, record_last=True)
        attention = row_attention(record.query[:, :, :1], record.key, record.scaling)[:, 1:]  # CLS row, patches
        ratio = call.config.important_ratio
        kept = [
            vispruner_units(states[1:], patch_attention, call.config.keep, ratio)
            for states, patch_attention in zip(hidden_states, attention, strict=True)
        ]
        return kept_patches_output(call, hidden_states, kept)

    def select_units(self, call: UnitCall) -> EncoderStageOutput:
        """Per row, VisPruner among its candidate units; a unit's attention is what its patches receive together."""
        hidden_states, alive, record = run_units_to_feature_layer(call, record_last=True)
        attention = call.encoder.criteria(record, alive).relation
        lead = call.encoder.query_slots
        kept = []
        for row, keep in enumerate(call.keeps):
            candidates = call.candidates(row).to(hidden_states.device)
            states = hidden_states[row, lead + candidates]
            chosen = vispruner_units(states, attention[row, candidates], keep, call.config.important_ratio)
            kept.append(candidates[chosen].cpu())
        return kept_units_output(call, hidden_states, kept)
