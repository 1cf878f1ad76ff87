"""HiPrune's defining steps on hand-checkable tensors, the attention it reads, and its place in the batteries."""

from __future__ import annotations

import pytest
import torch

import flowcut
from flowcut.core.scoring import received_attention
from flowcut.methods.hiprune import hiprune_units, neighbours


def test_neighbours_stay_inside_the_grid():
    # a 3x4 grid: unit 4 is row 1, column 0 (no left neighbour); unit 11 the bottom-right corner
    assert sorted(neighbours(torch.tensor([4]), (3, 4)).tolist()) == [0, 5, 8]
    assert sorted(neighbours(torch.tensor([11]), (3, 4)).tolist()) == [7, 10]
    assert sorted(neighbours(torch.tensor([5]), (3, 4)).tolist()) == [1, 4, 6, 9]


def test_anchors_buffers_then_registers():
    grid = (4, 4)
    object_attention = torch.zeros(16)
    object_attention[5] = 1.0  # the anchor: row 1, column 1
    output_attention = torch.arange(16, dtype=torch.float32)  # registers: the highest indices first
    # keep 10, share 0.5: round(10 · 0.5 / 5) = 1 anchor, its 4 neighbours, then 5 registers (15..11)
    kept = hiprune_units(object_attention, output_attention, grid, 10, 0.5)
    assert kept.tolist() == [1, 4, 5, 6, 9, 11, 12, 13, 14, 15]
    # share 0: registers alone
    assert hiprune_units(object_attention, output_attention, grid, 3, 0.0).tolist() == [13, 14, 15]
    # candidates restrict every choice (the anchor's neighbour 6 and register 15 may not survive)
    candidates = torch.tensor([i for i in range(16) if i not in (6, 15)])
    kept = hiprune_units(object_attention, output_attention, grid, 10, 0.5, candidates)
    assert kept.tolist() == [1, 4, 5, 8, 9, 10, 11, 12, 13, 14]  # anchor 5, buffers 1, 4, 9; registers 14..10, 8


def test_received_attention_is_the_column_mean_of_the_attention_matrix():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 3, 7, 4, generator=generator), torch.randn(2, 3, 7, 4, generator=generator)
    matrix = (query @ key.transpose(-1, -2) * 0.5).softmax(dim=-1)
    torch.testing.assert_close(received_attention(query, key, 0.5, chunk=3), matrix.mean(dim=(1, 2)))
    alive = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    alone = (query[1:, :, :5] @ key[1:, :, :5].transpose(-1, -2) * 0.5).softmax(dim=-1).mean(dim=(1, 2))
    padded = received_attention(query, key, 0.5, alive, chunk=2)
    torch.testing.assert_close(padded[1, :5], alone[0])
    assert padded[1, 5:].abs().sum() == 0


def test_hiprune_settings_are_checked(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"anchor_share=0\.2 is a HiPrune setting; it does not apply to 'flowcut'"):
        flowcut.FlowCutConfig(anchor_share=0.2)
    with pytest.raises(ValueError, match=r"object_layer must be a positive \(1-based\) layer number, got 0"):
        flowcut.FlowCutConfig(method="hiprune", object_layer=0)
    pixels = torch.zeros(1, 3, 84, 84)
    with flowcut.apply(model, keep=16, method="hiprune", object_layer=40), torch.no_grad():
        with pytest.raises(ValueError, match="object_layer=40 must be a layer before the feature layer"):
            model.model.get_image_features(pixels)
