"""VisPruner's defining steps on hand-checkable tensors, and against the stock tower on a tiny LLaVA-1.5."""

from __future__ import annotations

import pytest
import torch

import flowcut
from flowcut.methods.vispruner import remove_duplicates, vispruner_units


def unit(*components: float) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(components, dtype=torch.float32), dim=0)


def test_thinning_drops_the_candidates_of_a_that_duplicate_b():
    # candidates in attention order 0..5; A = 0, 2, 4 and B = 1, 3, 5; 0 duplicates 1 and 4 duplicates 3
    states = torch.stack([unit(1, 0, 0, 0), unit(1, 0, 0, 0), unit(0, 1, 0, 0), unit(0, 0, 1, 0)])
    states = torch.cat([states, torch.stack([unit(0, 0, 1, 0), unit(0, 0, 0, 1)])])
    order = torch.arange(6)
    assert remove_duplicates(states, order, 4).tolist() == [2, 1, 3, 5]
    assert remove_duplicates(states, order, 6).tolist() == list(range(6))  # nothing in excess: nothing dropped
    # keep 1 of 6: A loses all three (at most the excess, never more than A holds), then B halves in turn
    assert len(remove_duplicates(states, order, 1)) == 1


def test_a_step_drops_at_most_eight():
    states = torch.nn.functional.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    order = torch.arange(40)
    first_step = remove_duplicates(states, order, 32)  # one step: 8 of A's 20 go
    assert len(first_step) == 32 and set(range(1, 40, 2)) <= set(first_step.tolist())  # B is never thinned first


def test_important_units_then_diverse_ones_in_positional_order():
    states = torch.stack([unit(1, 0), unit(1, 0.01), unit(0, 1), unit(1, 0.02), unit(-1, 0.5), unit(0.7, 0.7)])
    attention = torch.tensor([0.1, 0.9, 0.05, 0.8, 0.02, 0.03])
    # T = 5, r = 0.4: units 1 and 3 by attention; the rest by attention are 0, 2, 5, 4, so A = (0, 5), B = (2, 4):
    # 5 is closer to 2 (cosine 0.71) than 0 is to anything in B (0), so 5 goes
    assert vispruner_units(states, attention, 5, 0.4).tolist() == [0, 1, 2, 3, 4]
    assert vispruner_units(states, attention, 4, 1.0).tolist() == [0, 1, 2, 3]  # attention alone
    # T = 4, r = 0.5: the excess of the rest is 2, so both of A go whatever their similarity
    assert vispruner_units(states, attention, 4, 0.5).tolist() == [1, 2, 3, 4]


def test_vispruner_keeps_the_stock_feature_layer_patches_and_refuses_others_settings(tiny, images):
    model, processor = tiny
    pixels = processor.image_processor(images, return_tensors="pt").pixel_values
    layer = model.config.vision_feature_layer
    with torch.no_grad():
        tower = model.model.vision_tower(pixels, output_hidden_states=True, output_attentions=False)
        stock = model.model.get_image_features(pixels).pooler_output
    with flowcut.apply(model, keep=16, method="vispruner") as handle, torch.no_grad():
        features = model.model.get_image_features(pixels).pooler_output
    for image, kept in enumerate(handle.last_trace.kept_indices):
        assert len(kept) == 16 and torch.equal(kept, kept.unique())
        torch.testing.assert_close(features[image], stock[image][kept], atol=1e-5, rtol=1e-5)
    assert tower.hidden_states[layer].shape[1] == 1 + stock[0].shape[0]  # the patches behind the stock tokens
    with pytest.raises(
        ValueError, match=r"important_ratio=0\.3 is a VisPruner setting; it does not apply to .flowcut."
    ):
        flowcut.FlowCutConfig(important_ratio=0.3)
    with pytest.raises(ValueError, match=r"important_ratio must be in \[0, 1\], got 1.5"):
        flowcut.FlowCutConfig(method="vispruner", important_ratio=1.5)
