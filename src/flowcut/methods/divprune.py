"""DivPrune (arXiv 2503.02175): attention-free max-min diversity selection on the projected tokens (SPEC §7)."""

from __future__ import annotations

import torch

from flowcut.core.encoder_stage import EncoderStageOutput
from flowcut.methods import (
    EncoderCall,
    Method,
    MethodOutput,
    UnitCall,
    kept_units_output,
    register,
    run_to_feature_layer,
    run_units_to_feature_layer,
    unpruned_trace,
)


def max_min_diverse(features: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy max-min selection of ``keep`` of the ``(N, D)`` tokens under cosine distance; ascending indices.

    The first pick is the token whose nearest other token is farthest away; each next pick is the
    token farthest from the picked set (its distance to the set being the minimum over the set).
    Ties go to the lowest index.
    """
    normed = torch.nn.functional.normalize(features.double(), dim=-1)
    distance = 1 - normed @ normed.T
    distance.fill_diagonal_(float("inf"))
    first = int(distance.min(dim=1).values.argmax())
    picked = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    picked[first] = True
    distance.fill_diagonal_(0.0)
    to_picked = distance[first].clone()
    for _ in range(keep - 1):
        following = int(to_picked.masked_fill(picked, float("-inf")).argmax())
        picked[following] = True
        to_picked = torch.minimum(to_picked, distance[following])
    return picked.nonzero().squeeze(1)


@register
class DivPrune(Method):
    name = "divprune"
    summary = "DivPrune (arXiv 2503.02175): max-min cosine diversity on the projected tokens, attention-free"

    def run(self, call: EncoderCall) -> MethodOutput:
        hidden_states, _ = run_to_feature_layer(call)
        projected = call.project(hidden_states[:, 1:])
        kept = [max_min_diverse(image, call.config.keep) for image in projected]
        features = torch.stack([image[indices] for image, indices in zip(projected, kept, strict=True)])
        patches = torch.stack([image[1 + indices] for image, indices in zip(hidden_states, kept, strict=True)])
        return MethodOutput(features, patches, [unpruned_trace(indices, call) for indices in kept])

    def select_units(self, call: UnitCall) -> EncoderStageOutput:
        """Each row's most diverse candidate units, measured on their projections (one token per unit)."""
        if call.project is None:
            raise ValueError("DivPrune measures diversity on the projected tokens: the family must pass its projector")
        hidden_states, _, _ = run_units_to_feature_layer(call)
        projected = call.project(hidden_states[:, call.encoder.query_slots :])
        kept = []
        for row, keep in enumerate(call.keeps):
            candidates = call.candidates(row)
            picks = max_min_diverse(projected[row, candidates.to(projected.device)], keep).cpu()
            kept.append(candidates[picks])
        return kept_units_output(call, hidden_states, kept)
