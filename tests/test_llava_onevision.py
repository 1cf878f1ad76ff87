"""LLaVA-OneVision (SigLIP without CLS, anyres_max_9, multi-image prompts) on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

import flowcut
from conftest import picture
from flowcut.core.encoder_stage import EncoderStageSettings, run_encoder_stage
from flowcut.families.clip import SiglipEncoderAdapter
from flowcut.testing import build_tiny_llava_onevision

ONE = "USER: <image>\nwhat is the colour ? ASSISTANT:"
TWO = "USER: <image><image>\nwhat is the colour ? ASSISTANT:"
KEEP = 64


WIDE = picture(60, 150, 0)
SQUARE = picture(100, 90, 1)


@pytest.fixture(scope="module")
def onevision():
    model, processor = build_tiny_llava_onevision(text_layers=4)
    processor.tokenizer.padding_side = "left"
    return model, processor


def answer(model, inputs: dict, **options) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=4, do_sample=False, **options)[:, -4:]


def test_siglip_stage_without_pruning_is_the_stock_tower(onevision):
    model, processor = onevision
    pixels = processor(images=WIDE, text=ONE, return_tensors="pt")["pixel_values"][0]
    tower = model.model.vision_tower
    adapter = SiglipEncoderAdapter(tower)
    with torch.no_grad():
        stock = tower(pixels, output_hidden_states=True).hidden_states[-1]
        with adapter.session() as bound:
            count = [adapter.num_patches] * len(pixels)
            settings = EncoderStageSettings(keep=1, feature_layer=adapter.num_layers - 1)
            stage = run_encoder_stage(bound, pixels, settings, count, count)
    torch.testing.assert_close(stage.hidden_states, stock, atol=1e-5, rtol=1e-5)


def test_keep_at_or_above_the_stock_tokens_is_the_stock_model(onevision):
    model, processor = onevision
    inputs = processor(images=[WIDE, SQUARE], text=[ONE, ONE], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    pruned_processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=pruned_processor, keep=2000), torch.no_grad():
        pruned = pruned_processor(images=[WIDE, SQUARE], text=[ONE, ONE], return_tensors="pt", padding=True)
        assert torch.equal(pruned["input_ids"], inputs["input_ids"])
        assert torch.equal(model(**pruned).logits, logits)


def test_budgets_single_and_multi_image_prompts_and_invariance(onevision):
    model, processor = onevision
    processor = copy.deepcopy(processor)
    handle = flowcut.apply(model, processor=processor, keep=KEEP)
    try:
        wide = processor(images=WIDE, text=ONE, return_tensors="pt")
        assert int((wide["input_ids"] == model.config.image_token_id).sum()) == 96  # 3 crops x 32
        alone = answer(model, wide)
        assert handle.last_trace.image_tokens == [(394, 96, KEEP)]
        # A two-image prompt: each image is one base view (144 patches + a newline), pruned to 64 there.
        mixed = processor(images=[[SQUARE, WIDE], [WIDE]], text=[TWO, ONE], return_tensors="pt", padding=True)
        assert (mixed["input_ids"] == model.config.image_token_id).sum(1).tolist() == [128, 96]
        together = answer(model, mixed)
        assert handle.last_trace.image_tokens == [(145, KEEP, KEEP), (145, KEEP, KEEP), (394, 96, KEEP)]
        assert torch.equal(together[1], alone[0])
        assert torch.equal(together, answer(model, mixed, use_cache=False))
    finally:
        handle.remove()
    assert "get_image_features" not in model.model.__dict__


def test_only_full_feature_selection_without_cls(onevision):
    model, _ = onevision
    changed = copy.deepcopy(model)
    changed.config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'full'"):
        flowcut.apply(changed, keep=KEEP)


def test_stock_counts_follow_the_interpolation_of_large_grids():
    """With anyres_max_1 the stock model shrinks a 2x2-crop grid; the budget's stock count matches the processor's."""
    model, processor = build_tiny_llava_onevision(text_layers=4, max_crops=1)
    stock = processor(images=SQUARE, text=ONE, return_tensors="pt")
    stock_count = int((stock["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        assert model(**stock).logits.shape[1] == stock["input_ids"].shape[1]  # the stock model agrees
    with flowcut.apply(model, processor=processor, keep=0.25) as handle, torch.no_grad():
        inputs = processor(images=SQUARE, text=ONE, return_tensors="pt")
        model(**inputs)
        assert handle.last_trace.image_tokens[0][0] == stock_count
        assert handle.last_trace.image_tokens[0][2] == round(0.25 * stock_count)


def test_remove_restores_the_stock_model(onevision):
    model, processor = onevision
    inputs = processor(images=[[SQUARE, WIDE]], text=[TWO], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
        with flowcut.apply(model, processor=copy.deepcopy(processor), keep=KEEP):
            pass
        assert torch.equal(model(**inputs).logits, before)


def test_a_pass_with_other_vision_settings_is_refused(onevision):
    model, processor = onevision
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=KEEP), torch.no_grad():
        inputs = processor(images=[WIDE], text=[ONE], return_tensors="pt")
        with pytest.raises(ValueError, match="FlowCut's anyres path uses the model's vision_aspect_ratio"):
            model(**inputs, vision_aspect_ratio="anyres_max_2")
        with pytest.raises(ValueError, match="FlowCut's anyres path uses the model's vision_feature_layer"):
            model(**inputs, vision_feature_layer=-3)
        same = model(**inputs, vision_aspect_ratio=model.config.vision_aspect_ratio).logits
        assert torch.equal(same, model(**inputs).logits)
