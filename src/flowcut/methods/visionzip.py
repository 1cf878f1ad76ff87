"""VisionZip (arXiv 2412.04467), as SPEC §7 defines it: dominant tokens by CLS attention, plus merged context.

At the feature layer: the CLS token and the patches with the most CLS attention (summed over
heads) are kept as they are; every other patch is merged into one of a few contextual tokens by
key similarity. VisionZip hands the CLS token to the language model, so ``keep`` counts it.
"""

from __future__ import annotations

import torch

from flowcut.core.scoring import row_attention
from flowcut.methods import EncoderCall, Method, MethodOutput, register, run_to_feature_layer, unpruned_trace


def visionzip_split(keep: int) -> tuple[int, int]:
    """``(dominant, contextual)`` tokens for a budget; the paper's 54+10, 108+20, 162+30 scaled to any keep.

    Halves round up (keep 16: 13 + 3).
    """
    contextual = int(keep * 10 / 64 + 0.5)
    return keep - contextual, contextual


def visionzip_tokens(
    hidden_states: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's VisionZip tokens ``(dominant + contextual, D)``, its dominant patches and contextual targets.

    ``hidden_states`` ``(1 + N, D)`` and ``keys`` ``(1 + N, d)`` (averaged over heads) are the feature
    layer's, slot 0 the CLS token; ``cls_attention`` ``(1 + N,)`` is the CLS row of its attention.
    Returned patch indices are 0-based over the N patches.
    """
    num_patches = hidden_states.shape[0] - 1
    dominant_patches = cls_attention[1:].topk(dominant - 1).indices.sort().values
    is_dominant = torch.zeros(num_patches, dtype=torch.bool, device=hidden_states.device)
    is_dominant[dominant_patches] = True
    remaining = (~is_dominant).nonzero().squeeze(1)
    tokens = [hidden_states[:1], hidden_states[1 + dominant_patches]]
    targets = remaining[:0]
    if contextual:
        metric = torch.nn.functional.normalize(keys[1 + remaining].float(), dim=-1)
        stride = max(1, len(remaining) // contextual)
        target_slots = torch.arange(0, len(remaining), stride, device=remaining.device)[:contextual]
        is_target = torch.zeros(len(remaining), dtype=torch.bool, device=remaining.device)
        is_target[target_slots] = True
        others = (~is_target).nonzero().squeeze(1)
        assignment = (metric[others] @ metric[target_slots].T).argmax(dim=-1)
        remaining_states = hidden_states[1 + remaining]
        sums = remaining_states.new_zeros(contextual, remaining_states.shape[-1])
        sums.index_add_(0, assignment, remaining_states[others])
        counts = torch.bincount(assignment, minlength=contextual).clamp(min=1).to(sums.dtype)
        tokens.append(remaining_states[target_slots] + sums / counts[:, None])
        targets = remaining[target_slots]
    return torch.cat(tokens), dominant_patches, targets


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
