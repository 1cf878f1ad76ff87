"""The pure math of SPEC §2 on hand-checkable tensors."""

from __future__ import annotations

import math

import pytest
import torch

from flowcut.core.scoring import (
    cls_criteria,
    entropy_ratio,
    is_prune_layer,
    layer_score,
    prune_count,
    row_attention,
    select_kept,
    uniform_prune_count,
    update_cumulative,
    value_l1_norm,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def three_token_case():
    # One head, head_dim 1, tokens [CLS, p1, p2]; q_cls = 1, keys = [0, 1, 2], values = [1, 2, -1].
    query = torch.tensor([1.0, 5.0, 5.0], dtype=torch.float64).view(1, 1, 3, 1)
    key = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64).view(1, 1, 3, 1)
    value = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64).view(1, 1, 3, 1)
    return query, key, value


def test_criteria_by_hand():
    query, key, value = three_token_case()
    criteria = cls_criteria(query, key, value, scaling=1.0)
    total = 1 + math.e + math.e**2
    assert criteria.relation[0].tolist() == pytest.approx([math.e / total, math.e**2 / total], abs=1e-12)
    semantic_total = math.e + math.e**2 + math.exp(-1)
    assert criteria.semantic[0].tolist() == pytest.approx(
        [math.e**2 / semantic_total, math.exp(-1) / semantic_total], abs=1e-12
    )
    assert criteria.density[0].tolist() == [2.0, 1.0]
    # Normalised over patches: a = [σ(-1), σ(1)], s = [σ(3), σ(-3)].
    score = layer_score(criteria)
    assert score[0].tolist() == pytest.approx(
        [(sigmoid(-1) + sigmoid(3)) * 2, (sigmoid(1) + sigmoid(-3)) * 1], abs=1e-12
    )
    p = [sigmoid(-1), sigmoid(1)]
    expected_ratio = -(p[0] * math.log(p[0]) + p[1] * math.log(p[1])) / math.log(2)
    assert entropy_ratio(criteria.relation)[0].item() == pytest.approx(expected_ratio, abs=1e-12)


def test_relation_uses_scaling_and_semantic_does_not():
    query, key, value = three_token_case()
    half = cls_criteria(query, key, value, scaling=0.5)
    total = 1 + math.exp(0.5) + math.e
    assert half.relation[0].tolist() == pytest.approx([math.exp(0.5) / total, math.e / total], abs=1e-12)
    assert torch.equal(half.semantic, cls_criteria(query, key, value, scaling=1.0).semantic)


def test_heads_are_averaged_after_softmax():
    key = torch.tensor([[0.0], [1.0], [0.0]]).view(1, 1, 3, 1).expand(1, 2, 3, 1)
    query_row = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    row = row_attention(query_row, key, scaling=1.0)
    head_one = torch.softmax(torch.tensor([0.0, 1.0, 0.0]), 0)
    head_two = torch.softmax(torch.tensor([0.0, -1.0, 0.0]), 0)
    assert torch.allclose(row[0], (head_one + head_two) / 2)


def test_density_is_l1_of_head_mean():
    value = torch.tensor([[1.0, -2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # two heads, one token
    assert value_l1_norm(value).item() == pytest.approx(abs(2.0) + abs(1.0))


def test_padding_slots_change_nothing():
    torch.manual_seed(0)
    query, key, value = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    plain = cls_criteria(query, key, value, 0.5)
    padded = [torch.cat([t, torch.randn(1, 2, 3, 4, dtype=torch.float64) * 9], dim=2) for t in (query, key, value)]
    alive = torch.tensor([[True] * 5 + [False] * 3])
    masked = cls_criteria(*padded, 0.5, alive)
    patch_alive = alive[:, 1:]
    assert torch.allclose(masked.relation[:, :4], plain.relation)
    assert torch.allclose(masked.semantic[:, :4], plain.semantic)
    assert torch.allclose(layer_score(masked, patch_alive)[:, :4], layer_score(plain))
    assert torch.all(layer_score(masked, patch_alive)[:, 4:] == 0)
    assert torch.allclose(entropy_ratio(masked.relation, patch_alive), entropy_ratio(plain.relation))


def test_scores_are_float32_for_half_inputs():
    query, key, value = (t.half() for t in three_token_case())
    criteria = cls_criteria(query, key, value, 1.0)
    assert criteria.relation.dtype == criteria.semantic.dtype == criteria.density.dtype == torch.float32


def test_cumulative_ema():
    first = torch.tensor([1.0, 2.0])
    assert torch.equal(update_cumulative(None, first), first)
    assert update_cumulative(first, torch.tensor([3.0, 0.0])).tolist() == [2.0, 1.0]
    assert update_cumulative(first, torch.tensor([3.0, 0.0]), ema_weight=0.25).tolist() == [2.5, 0.5]


def test_schedule_of_llava_15():
    # 24 layers, features from layer 22 (vision_feature_layer=-2): F = 21, prune after layers 1, 3, …, 21.
    last_prune = 21
    assert [i for i in range(24) if is_prune_layer(last_prune - i)] == list(range(1, 22, 2))
    assert [i for i in range(24) if is_prune_layer(last_prune - i, interval=3)] == [0, 3, 6, 9, 12, 15, 18, 21]


def test_prune_count():
    assert prune_count(576, 64, 21, 0.9) == round(512 / math.sqrt(21) * (1 - 0.81))  # 21
    assert prune_count(576, 64, 21, 1.0) == 0  # uniform attention: nothing pruned yet
    assert prune_count(576, 64, 0, 0.99) == 512  # the final step removes everything above keep
    assert prune_count(64, 64, 4, 0.1) == 0
    # Half-to-even rounding, as Tensor.round in the reference code: 2.5 -> 2, 3.5 -> 4.
    assert prune_count(69, 64, 4, 0.0) == 2
    assert prune_count(71, 64, 4, 0.0) == 4
    # Never below keep.
    assert prune_count(70, 64, 1, 0.0) == 6


def test_uniform_prune_count_takes_equal_steps():
    # L = 4 with interval 2: this step and the steps at L = 2 and L = 0 remain; 512 / 3 = 170.67 -> 171.
    assert uniform_prune_count(576, 64, 4, 2) == 171
    assert uniform_prune_count(405, 64, 2, 2) == 170  # 341 / 2 = 170.5 -> 170 (half to even)
    assert uniform_prune_count(235, 64, 0, 2) == 171  # the last step removes the rest
    assert uniform_prune_count(64, 64, 4, 2) == 0


def test_relation_only_score_is_the_normalised_cls_attention():
    query, key, value = three_token_case()
    criteria = cls_criteria(query, key, value, scaling=1.0)
    score = layer_score(criteria, relation_only=True)
    assert score[0].tolist() == pytest.approx([sigmoid(-1), sigmoid(1)], abs=1e-12)


def test_select_kept_is_sorted_topk():
    cumulative = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.05])
    assert select_kept(cumulative, 2).tolist() == [1, 3]
    assert select_kept(cumulative, 3).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="cannot keep 6 of 5"):
        select_kept(cumulative, 6)
