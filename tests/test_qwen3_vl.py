"""Qwen3-VL specifics on tiny random models: DeepStack features follow the kept units in both stages.

The shared Qwen battery (``test_qwen.py``) runs on Qwen3-VL dense and MoE too; this file checks
what only Qwen3-VL has.
"""

from __future__ import annotations

import copy

import pytest
import torch

import flowcut
from conftest import picture
from flowcut import compat
from flowcut.core.encoder_stage import EncoderStageSettings, run_encoder_stage
from flowcut.families.qwen_vision import QwenVisionAdapter
from flowcut.testing import build_tiny_qwen

WIDE, TALL = picture(48, 64, 0), picture(64, 40, 1)  # 6x8 and 8x5 merge groups


@pytest.fixture(scope="module")
def qwen3():
    model, processor = build_tiny_qwen("3")
    processor.tokenizer.padding_side = "left"
    return model, processor


def prompt(processor) -> str:
    content = [{"type": "image"}, {"type": "text", "text": "what is the colour ?"}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def inputs_for(processor, images) -> dict:
    return processor(images=images, text=[prompt(processor)] * len(images), return_tensors="pt", padding=True)


def test_unpruned_encoder_gives_the_stock_deepstack_features(qwen3):
    model, processor = qwen3
    batch = inputs_for(processor, [WIDE, TALL])
    grid = batch["image_grid_thw"]
    stock = model.model.get_image_features(batch["pixel_values"], grid)
    adapter = QwenVisionAdapter(model.model.visual)
    assert adapter.deepstack_layers == [1, 3, 4]
    settings = EncoderStageSettings(keep=48, feature_layer=adapter.num_layers - 1)
    with torch.no_grad(), adapter.session(grid) as bound:
        stage = run_encoder_stage(bound, batch["pixel_values"], settings, [48, 40], [48, 40])
        merged = bound.merge(stage.hidden_states, stage.counts)
        deepstack = bound.deepstack([image.kept_indices for image in stage.images])
    for ours, theirs in zip(merged, stock.pooler_output, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for layer_ours, layer_theirs in zip(deepstack, stock.deepstack_features, strict=True):
        for ours, theirs in zip(layer_ours, layer_theirs, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_kept_units_carry_their_own_deepstack_features(qwen3):
    """Pruned once after the last block (after every DeepStack block): the kept units' rows of the stock features."""
    model, processor = qwen3
    with torch.no_grad():
        batch = inputs_for(processor, [WIDE, TALL])
        stock = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    pruned_processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=pruned_processor, keep=8, stages="encoder", schedule="one_shot") as handle:
        batch = inputs_for(pruned_processor, [WIDE, TALL])
        with torch.no_grad():
            ours = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
            model(**batch)
        kept = [image.kept_indices for image in handle.last_trace.images]
    assert all(torch.equal(item.kept_units, units) for item, units in zip(ours.media[0], kept, strict=True))
    assert [len(units) for units in kept] == [8, 8]
    for layer_ours, layer_stock in zip(ours.deepstack_features, stock.deepstack_features, strict=True):
        for image, units in enumerate(kept):
            torch.testing.assert_close(layer_ours[image], layer_stock[image][units], atol=1e-5, rtol=1e-5)


def test_language_stage_adds_deepstack_to_the_kept_tokens_only(qwen3):
    """FastV prunes after decoder layer 1; the additions after layers 1 and 2 go to the kept visual tokens."""
    model, processor = qwen3
    language = model.model.language_model
    calls = []

    def spy(hidden_states, visual_pos_masks, visual_embeds):  # a user's own override, restored on remove
        calls.append((hidden_states.shape[1], visual_pos_masks.clone(), visual_embeds.clone()))
        return type(language)._deepstack_process(language, hidden_states, visual_pos_masks, visual_embeds)

    language._deepstack_process = spy
    try:
        pruned_processor = copy.deepcopy(processor)
        with flowcut.apply(model, processor=pruned_processor, keep=8, method="fastv") as handle:
            batch = inputs_for(pruned_processor, [WIDE, TALL])
            with torch.no_grad():
                model(**batch)
            positions = handle.last_trace.language_positions
        assert language._deepstack_process is spy
        full_length = batch["input_ids"].shape[1]
        assert [length for length, _, _ in calls] == [full_length, positions.shape[1], positions.shape[1]]
        with torch.no_grad():  # FastV leaves the encoder whole: the stock DeepStack rows, per decoder layer
            stock = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        full_rows = [torch.cat(layer) for layer in stock.deepstack_features]
        full_mask = calls[0][1]
        assert torch.equal(calls[0][2], full_rows[0])
        rank = full_mask.flatten().long().cumsum(0).view_as(full_mask) - 1
        for layer, (_, mask, rows) in enumerate(calls[1:], start=1):
            # Row 1's image is shorter, its prompt padded: row 0 holds 8 hidden filler slots (pruned visual tokens).
            assert mask.sum(1).tolist() == [16, 8]
            assert torch.equal(mask, full_mask.gather(1, positions))
            assert torch.equal(rows, full_rows[layer][rank.gather(1, positions)[mask]])
    finally:
        del language._deepstack_process


def test_remove_restores_the_language_model(qwen3):
    """(Videos: ``test_qwen_video.py`` runs its battery on Qwen3-VL, timestamps between the slices.)"""
    model, processor = qwen3
    language = model.model.language_model
    before = dict(language.__dict__)
    handle = flowcut.apply(model, processor=copy.deepcopy(processor), keep=8)
    assert compat.DEEPSTACK_ADD in language.__dict__
    handle.remove()
    assert language.__dict__.keys() == before.keys()


@pytest.mark.parametrize("method", ["flowcut", "visionzip", "divprune", "pool", "random"])
def test_qwen3_5_prunes_in_the_encoder_alone_to_exactly_the_budget(method):
    """Qwen3.5's decoder layer 1 is linear attention: every method keeps T merge groups in the encoder."""
    model, processor = build_tiny_qwen("3.5", vision_layers=4, text_layers=4)
    processor.tokenizer.padding_side = "left"
    with flowcut.apply(model, processor=processor, keep=6, method=method) as handle:
        assert handle._family.pruner is None
        batch = inputs_for(processor, [WIDE, TALL])
        assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [6, 6]
        with torch.no_grad():
            model(**batch)
        trace = handle.last_trace
        assert [tokens[1:] for tokens in trace.image_tokens] == [(6, 6), (6, 6)]
        assert all(len(image.kept_indices) == 6 for image in trace.images)
