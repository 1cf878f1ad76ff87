"""Scoring visual tokens inside the language model from the last prompt token (pure math, no model code).

Used by pruning at a decoder layer: FastV ranks visual tokens by the attention they receive from
the last prompt token; FlowCut's language-model stage (SPEC §3) scores them by the last token's
relation and semantic views times the value norm. Shapes: ``B`` rows, ``H`` query heads, ``L``
prompt positions, ``d`` head dim. Key and value heads are repeated to the query heads (GQA).
"""

from __future__ import annotations

import torch

from flowcut.core.scoring import score_dtype

SCORES = ("attention", "flowcut")
"""``"attention"``: attention received from the last token (FastV); ``"flowcut"``: SPEC §3's score."""


def last_real_positions(visible: torch.Tensor) -> torch.Tensor:
    """Each row's last real position under a ``(B, L)`` mask of real tokens (left or right padding): ``(B,)``."""
    return visible.shape[1] - 1 - visible.flip(1).int().argmax(1)


def _per_query_head(states: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat ``(B, H_kv, L, d)`` key/value heads to ``heads`` query heads."""
    return states.repeat_interleave(heads // states.shape[1], dim=1)


def _row_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax over the allowed positions: ``(B, H, L), (B, L) -> (B, L)``."""
    return logits.masked_fill(~allowed[:, None, :], float("-inf")).softmax(dim=-1).mean(dim=1)


def last_token_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    last_index: torch.Tensor,
    visible: torch.Tensor,
    visual: torch.Tensor,
    score: str = "attention",
) -> torch.Tensor:
    """Per position, the score of each visual token seen from the row's last prompt token; -inf elsewhere.

    ``query`` ``(B, H, L, d)`` and ``key``/``value`` ``(B, H_kv, L, d)`` are one decoder layer's own
    (post-rotary) projections; ``last_index`` ``(B,)`` the last real position of each row;
    ``visible`` ``(B, L)`` the real (non-padding) positions; ``visual`` ``(B, L)`` the visual tokens.
    """
    if score not in SCORES:
        raise ValueError(f"unknown language-model score {score!r}; available: {', '.join(SCORES)}")
    dtype = score_dtype(query.dtype)
    heads = query.shape[1]
    rows = torch.arange(query.shape[0], device=query.device)
    last_query = query[rows, :, last_index].to(dtype)  # (B, H, d)
    keys = _per_query_head(key, heads).to(dtype)
    values = _per_query_head(value, heads).to(dtype)
    relation_logits = torch.einsum("bhd,bhld->bhl", last_query, keys) * scaling
    if score == "attention":
        # The layer's real attention probabilities: softmax over every key the last token sees.
        received = _row_softmax(relation_logits, visible)
        return received.masked_fill(~visual, float("-inf"))
    visual_keys = visual & visible
    relation = _row_softmax(relation_logits, visual_keys)
    last_value = values[rows, :, last_index]
    semantic = _row_softmax(torch.einsum("bhd,bhld->bhl", last_value, values) * scaling, visual_keys)
    density = values.mean(dim=1).abs().sum(dim=-1)
    combined = (relation / relation.sum(-1, keepdim=True) + semantic / semantic.sum(-1, keepdim=True)) * density
    return combined.masked_fill(~visual_keys, float("-inf"))


def kept_positions(scores: torch.Tensor, visual: torch.Tensor, tokens_per_image: int, keep: int) -> torch.Tensor:
    """Positions that continue past the pruning layer: every non-visual one and each image's top ``keep``.

    Visual tokens of a row form consecutive images of ``tokens_per_image`` tokens each (in order);
    every row must hold the same number of images. Returns ``(B, L')`` ascending positions.
    """
    rows = []
    for row_scores, row_visual in zip(scores, visual, strict=True):
        positions = row_visual.nonzero().squeeze(1)
        if len(positions) % tokens_per_image:
            raise ValueError(
                f"a row holds {len(positions)} visual tokens, not a multiple of {tokens_per_image} per image"
            )
        keep_mask = ~row_visual
        for image in positions.split(tokens_per_image):
            chosen = row_scores[image].topk(min(keep, len(image))).indices
            keep_mask[image[chosen]] = True
        rows.append(keep_mask.nonzero().squeeze(1))
    if len({len(row) for row in rows}) > 1:
        raise ValueError("every sample of a batch must hold the same number of images for language-model pruning")
    return torch.stack(rows)
