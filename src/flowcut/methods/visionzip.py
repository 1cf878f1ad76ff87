"""VisionZip (arXiv 2412.04467), as SPEC §7 defines it: dominant tokens by CLS attention, plus merged context.

At the feature layer: the CLS token and the patches with the most CLS attention (summed over
heads) are kept as they are; every other patch is merged into one of a few contextual tokens by
key similarity. VisionZip hands the CLS token to the language model, so ``keep`` counts it
(LLaVA-1.5); two-stage families hand over units only (:meth:`VisionZip.select_units`).
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
    kept_units_output,
    register,
    run_to_feature_layer,
    run_units_to_feature_layer,
    unpruned_trace,
)


def visionzip_split(keep: int) -> tuple[int, int]:
    """``(dominant, contextual)`` tokens for a budget; the paper's 54+10, 108+20, 162+30 scaled to any keep.

    Halves round up (keep 16: 13 + 3).
    """
    contextual = int(keep * 10 / 64 + 0.5)
    return keep - contextual, contextual


def visionzip_patches(
    patch_states: torch.Tensor, patch_attention: torch.Tensor, patch_keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's choice among ``N`` patches: the ``dominant`` most attended, and ``contextual`` merged tokens.

    ``patch_states`` ``(N, D)``, ``patch_attention`` ``(N,)`` (what the query token gives each patch)
    and ``patch_keys`` ``(N, d)`` (averaged over heads). Returns the dominant patch indices
    (ascending), the contextual targets' patch indices (in target order) and the contextual tokens
    ``(contextual, D)``: each target's state plus the mean of the states assigned to it by key.
    """
    num_patches = patch_states.shape[0]
    dominant_patches = patch_attention.topk(dominant).indices.sort().values
    is_dominant = torch.zeros(num_patches, dtype=torch.bool, device=patch_states.device)
    is_dominant[dominant_patches] = True
    remaining = (~is_dominant).nonzero().squeeze(1)
    if not contextual:
        return dominant_patches, remaining[:0], patch_states[:0]
    metric = torch.nn.functional.normalize(patch_keys[remaining].float(), dim=-1)
    stride = max(1, len(remaining) // contextual)
    target_slots = torch.arange(0, len(remaining), stride, device=remaining.device)[:contextual]
    is_target = torch.zeros(len(remaining), dtype=torch.bool, device=remaining.device)
    is_target[target_slots] = True
    others = (~is_target).nonzero().squeeze(1)
    assignment = (metric[others] @ metric[target_slots].T).argmax(dim=-1)
    remaining_states = patch_states[remaining]
    sums = remaining_states.new_zeros(contextual, remaining_states.shape[-1])
    sums.index_add_(0, assignment, remaining_states[others])
    counts = torch.bincount(assignment, minlength=contextual).clamp(min=1).to(sums.dtype)
    return dominant_patches, remaining[target_slots], remaining_states[target_slots] + sums / counts[:, None]


def visionzip_tokens(
    hidden_states: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's VisionZip tokens ``(dominant + contextual, D)``, its dominant patches and contextual targets.

    ``hidden_states`` ``(1 + N, D)`` and ``keys`` ``(1 + N, d)`` (averaged over heads) are the feature
    layer's, slot 0 the CLS token; ``cls_attention`` ``(1 + N,)`` is the CLS row of its attention.
    ``dominant`` counts the CLS token. Returned patch indices are 0-based over the N patches.
    """
    dominant_patches, targets, merged = visionzip_patches(
        hidden_states[1:], cls_attention[1:], keys[1:], dominant - 1, contextual
    )
    return torch.cat([hidden_states[:1], hidden_states[1 + dominant_patches], merged]), dominant_patches, targets


@register
class VisionZip(Method):
    name = "visionzip"
    summary = "VisionZip (arXiv 2412.04467): CLS + dominant patches by CLS attention, contextual tokens merged by key"

    def run(self, call: EncoderCall) -> MethodOutput:
        hidden_states, record = run_to_feature_layer(call, record_last=True)
        dominant, contextual = visionzip_split(call.config.keep)
        heads = record.query.shape[1]
        cls_attention = row_attention(record.query[:, :, :1], record.key, record.scaling) * heads  # summed
        keys = record.key.mean(dim=1)
        tokens, traces = [], []
        for image in range(hidden_states.shape[0]):
            image_tokens, dominant_patches, targets = visionzip_tokens(
                hidden_states[image], cls_attention[image], keys[image], dominant, contextual
            )
            tokens.append(image_tokens)
            kept = torch.cat([dominant_patches, targets]).sort().values
            traces.append(unpruned_trace(kept, call))
        tokens = torch.stack(tokens)
        return MethodOutput(call.project(tokens), tokens, traces)

    def select_units(self, call: UnitCall) -> EncoderStageOutput:
        """Per row: dominant units by the query token's attention, contextual units merged by key.

        The query token is the tower's own: CLS where it has one, else the global token (SPEC §4);
        a unit's attention is what its patches receive together, its key their mean key. Two-stage
        families hand the language model units only, so the CLS slot goes to one more dominant unit,
        and each contextual token stands at its target unit's place (tokens stay in unit order).
        """
        hidden_states, alive, record = run_units_to_feature_layer(call, record_last=True)
        attention = call.encoder.criteria(record, alive).relation
        keys = call.encoder.unit_keys(record, alive)
        lead = call.encoder.query_slots
        kept, tokens = [], []
        for row, keep in enumerate(call.keeps):
            candidates = call.candidates(row).to(hidden_states.device)
            _, contextual = visionzip_split(keep)
            dominant_units, targets, merged = visionzip_patches(
                hidden_states[row, lead + candidates],
                attention[row, candidates],
                keys[row, candidates],
                keep - contextual,
                contextual,
            )
            chosen = torch.cat([dominant_units, targets])
            order = chosen.argsort()
            kept.append(candidates[chosen[order]].cpu())
            tokens.append(torch.cat([hidden_states[row, lead + candidates[dominant_units]], merged])[order])
        return kept_units_output(call, hidden_states, kept, tokens)
