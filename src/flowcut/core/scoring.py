"""FlowCut's scoring and schedule math (SPEC §2): tensors in, tensors out, no model code.

Shapes: ``B`` images, ``H`` heads, ``K`` token slots (slot 0 is the query token, CLS in CLIP),
``d`` head dim. ``alive`` masks mark the slots holding real tokens (the rest is batch padding).
Every function computes in at least float32, whatever the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype score math runs in: float32, or float64 when the model itself runs in float64."""
    return torch.promote_types(dtype, torch.float32)


def row_attention(
    query_row: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    alive: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged softmax of one query row over all alive keys: ``(B,H,1,d),(B,H,K,d) -> (B,K)``.

    This is one row of the attention matrix, O(K·d) per head; the K×K matrix is never formed.
    """
    return _row_softmax(query_row, key, scaling, alive).mean(dim=1)


def row_logits(query_row: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Unscaled logits of one query row per head against every key: ``(B,H,d),(B,H,K,d) -> (B,H,K)``.

    A broadcast product summed over d, not a matmul: attention hands over keys as a strided view,
    which a batched matmul with a one-row query first copies (about 25× slower on CPU at LLaVA-NeXT's
    5 crops × 577 tokens × 16 heads); each image's row is also computed alone, whatever the batch.
    """
    return (key * query_row[..., None, :]).sum(dim=-1)


def _row_softmax(
    query_row: torch.Tensor, key: torch.Tensor, scaling: float, alive: torch.Tensor | None
) -> torch.Tensor:
    """Per-head softmax of one query row over all alive keys: ``(B,H,1,d),(B,H,K,d) -> (B,H,K)``."""
    dtype = score_dtype(query_row.dtype)
    logits = row_logits(query_row.to(dtype).squeeze(-2), key.to(dtype)) * scaling
    if alive is not None:
        logits = logits.masked_fill(~alive[:, None, :], float("-inf"))
    return logits.softmax(dim=-1)


def received_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, alive: torch.Tensor | None = None, chunk: int = 256
) -> torch.Tensor:
    """The attention each token receives, averaged over heads and over every alive query: ``(B,H,K,d) -> (B,K)``.

    The column means of the layer's attention matrix, computed ``chunk`` query rows at a time so the
    ``K × K`` matrix is never held whole. Padding slots (``alive`` False) neither attend nor are attended.
    """
    dtype = score_dtype(query.dtype)
    query, key = query.to(dtype), key.to(dtype)
    batch, heads, tokens, _ = query.shape
    total = query.new_zeros(batch, tokens)
    mask = None if alive is None else ~alive[:, None, None, :]
    for start in range(0, tokens, chunk):
        logits = query[:, :, start : start + chunk] @ key.transpose(-1, -2) * scaling
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        rows = logits.softmax(dim=-1)
        if alive is not None:
            rows = rows * alive[:, None, start : start + chunk, None]
        total += rows.sum(dim=(1, 2))
    queries = torch.full((batch,), float(tokens), dtype=dtype, device=query.device)
    if alive is not None:
        queries = alive.sum(dim=1).to(dtype)
    return total / (heads * queries[:, None])


def value_l1_norm(value: torch.Tensor) -> torch.Tensor:
    """Information density: L1 norm of each token's head-averaged value vector, ``(B,H,K,d) -> (B,K)``."""
    return value.to(score_dtype(value.dtype)).mean(dim=1).abs().sum(dim=-1)


@dataclass
class CriteriaScores:
    """The per-patch criteria of one layer (CLS excluded), each ``(B, N)``.

    ``semantic`` is None where the encoder has no CLS value to compare with (the global-token view
    of CLS-free encoders, SPEC §4); the score is then ``a/Σa · n``.
    """

    relation: torch.Tensor
    semantic: torch.Tensor | None
    density: torch.Tensor


def cls_criteria(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    alive: torch.Tensor | None = None,
) -> CriteriaScores:
    """Relation, semantic and density criteria of every patch seen from the CLS token (slot 0).

    ``query``/``key``/``value`` are the layer's own ``(B,H,K,d)`` projections. The semantic term
    is unscaled, as in the reference code's vision stage.
    """
    return criteria_from_head_sums(cls_head_sums(query, key, value, scaling, alive))


@dataclass
class CriteriaHeadSums:
    """The CLS-view criteria of every patch summed over some heads, before the average over all heads.

    A tensor-parallel vision encoder holds a share of the heads on each rank: summing these terms
    across ranks (an all-reduce) and then calling :func:`criteria_from_head_sums` gives exactly the
    criteria of the full set of heads, so every rank selects the same patches.
    """

    relation: torch.Tensor
    """``(B, N)``: per head, the softmax of ``q_cls · k_j · scaling`` over all alive tokens, summed over heads."""
    semantic: torch.Tensor
    """``(B, N)``: per head, the softmax of ``v_cls · v_j`` over all alive tokens, summed over heads."""
    value: torch.Tensor
    """``(B, N, d)``: each patch's value vectors summed over heads."""
    heads: int
    """How many heads the sums run over."""


def cls_head_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    alive: torch.Tensor | None = None,
) -> CriteriaHeadSums:
    """The head sums behind :func:`cls_criteria` for the heads in ``(B,H,K,d)`` projections (CLS at slot 0)."""
    relation = _row_softmax(query[:, :, :1], key, scaling, alive).sum(dim=1)
    semantic = _row_softmax(value[:, :, :1], value, 1.0, alive).sum(dim=1)
    value_sum = value[:, :, 1:].to(score_dtype(value.dtype)).sum(dim=1)
    return CriteriaHeadSums(relation[:, 1:], semantic[:, 1:], value_sum, heads=query.shape[1])


def criteria_from_head_sums(sums: CriteriaHeadSums) -> CriteriaScores:
    """Head averages of the summed terms: relation, semantic, and density as the L1 norm of the mean value."""
    heads = sums.heads
    return CriteriaScores(sums.relation / heads, sums.semantic / heads, (sums.value / heads).abs().sum(dim=-1))


def global_query_criteria(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    alive: torch.Tensor | None = None,
) -> CriteriaScores:
    """Relation and density of every token seen from the global token (encoders without CLS, SPEC §4).

    The global token's query is, per head, the mean of the alive tokens' (post-rotary) queries; it
    attends over every alive key. ``(B,H,K,d)`` projections in, ``(B,K)`` criteria out, no semantic term.
    """
    dtype = score_dtype(query.dtype)
    query = query.to(dtype)
    if alive is None:
        global_query = query.mean(dim=2, keepdim=True)
    else:
        weights = alive[:, None, :, None].to(dtype)
        global_query = (query * weights).sum(dim=2, keepdim=True) / weights.sum(dim=2, keepdim=True)
    relation = row_attention(global_query, key, scaling, alive)
    return CriteriaScores(relation, None, value_l1_norm(value))


def grouped(values: torch.Tensor, group: int, reduce: str = "sum") -> torch.Tensor:
    """Per-token values ``(B, K)`` of groups of ``group`` consecutive tokens, summed or averaged: ``(B, K / group)``."""
    batch, tokens = values.shape
    if tokens % group:
        raise ValueError(f"{tokens} tokens do not form groups of {group}")
    view = values.view(batch, tokens // group, group)
    return view.sum(dim=-1) if reduce == "sum" else view.mean(dim=-1)


def group_criteria(criteria: CriteriaScores, group: int) -> CriteriaScores:
    """Criteria of groups of ``group`` consecutive tokens: attention summed, density averaged.

    The sum is the attention the whole group receives; the mean keeps density on the scale of one token.
    """
    semantic = None if criteria.semantic is None else grouped(criteria.semantic, group)
    return CriteriaScores(grouped(criteria.relation, group), semantic, grouped(criteria.density, group, "mean"))


def _masked_normalise(score: torch.Tensor, patch_alive: torch.Tensor | None) -> torch.Tensor:
    if patch_alive is not None:
        score = score.masked_fill(~patch_alive, 0.0)
    return score / score.sum(dim=-1, keepdim=True)


def layer_score(
    criteria: CriteriaScores, patch_alive: torch.Tensor | None = None, relation_only: bool = False
) -> torch.Tensor:
    """``S = (a/Σa + s/Σs) · n`` per patch; padded patches score 0.

    ``relation_only`` (ablation: multi-criteria off) scores by the CLS attention alone, ``S = a/Σa``.
    Without a semantic term (global-token encoders) the score is ``S = a/Σa · n``.
    """
    relation = _masked_normalise(criteria.relation, patch_alive)
    if relation_only:
        score = relation
    elif criteria.semantic is None:
        score = relation * criteria.density
    else:
        score = (relation + _masked_normalise(criteria.semantic, patch_alive)) * criteria.density
    if patch_alive is not None:
        score = score.masked_fill(~patch_alive, 0.0)
    return score


def update_cumulative(cumulative: torch.Tensor | None, score: torch.Tensor, ema_weight: float = 0.5) -> torch.Tensor:
    """Cumulative score over layers: the first scored layer's score, then ``w·C + (1−w)·S``."""
    if cumulative is None:
        return score.clone()
    return ema_weight * cumulative + (1.0 - ema_weight) * score


def entropy_ratio(relation: torch.Tensor, patch_alive: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of the normalised relation scores over the alive patches, divided by its maximum ``log N``.

    ``(B, N) -> (B,)``. 1 means uniform attention, values near 0 mean concentrated attention.
    """
    probs = _masked_normalise(relation, patch_alive)
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
    if patch_alive is None:
        alive_count = torch.full_like(entropy, relation.shape[-1])
    else:
        alive_count = patch_alive.sum(dim=-1).to(entropy.dtype)
    return entropy / alive_count.log()


def is_prune_layer(remaining_layers: int, interval: int = 2) -> bool:
    """Whether a layer with ``remaining_layers`` (L = F − i) left before the final prune prunes."""
    return remaining_layers >= 0 and remaining_layers % interval == 0


def prune_count(alive: int, keep: int, remaining_layers: int, entropy_ratio_value: torch.Tensor | float) -> int:
    """How many patches one prune step removes: ``round((N − T)/√L · (1 − (H/log N)²))``.

    At the final step (L = 0) everything above ``keep`` goes. Rounding is half-to-even, as in the
    reference code's ``Tensor.round``. The result never takes the count below ``keep``.
    """
    if alive <= keep:
        return 0
    if remaining_layers == 0:
        return alive - keep
    ratio = torch.as_tensor(entropy_ratio_value)
    raw = (alive - keep) / math.sqrt(remaining_layers) * (1 - ratio**2)
    return min(int(raw.round().item()), alive - keep)


def uniform_prune_count(alive: int, keep: int, remaining_layers: int, interval: int = 2) -> int:
    """Ablation of the entropy-adaptive count: equal steps from ``alive`` down to ``keep``.

    The prune steps left (this one included) are ``L // interval + 1``; each removes an equal share
    of what is above ``keep`` (half-to-even rounding), and the final step (L = 0) removes the rest.
    """
    if alive <= keep:
        return 0
    steps_left = remaining_layers // interval + 1
    return min(int(torch.tensor((alive - keep) / steps_left).round().item()), alive - keep)


def select_kept(cumulative: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` largest cumulative scores of one image, in ascending (spatial) order."""
    if count > cumulative.shape[-1]:
        raise ValueError(f"cannot keep {count} of {cumulative.shape[-1]} tokens")
    return torch.topk(cumulative, count, dim=-1).indices.sort(dim=-1).values
