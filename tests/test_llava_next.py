"""LLaVA-NeXT (anyres): two-stage FlowCut on tiny random models, the SPEC §5 invariants."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

import flowcut
from conftest import picture
from flowcut.core.encoder_stage import EncoderStageSettings, run_encoder_stage
from flowcut.families.clip import ClipEncoderAdapter
from flowcut.testing import build_tiny_llava_next

PROMPT = "USER: <image>\nwhat is the colour ? ASSISTANT:"
TEXT_ONLY = "USER: what is the colour ? ASSISTANT:"
KEEP = 64


WIDE = picture(60, 150, 0)  # 1x2 crops, letterboxed top and bottom
SQUARE = picture(100, 90, 1)  # 2x2 crops


@pytest.fixture(scope="module")
def next_model():
    model, processor = build_tiny_llava_next(vision_layers=6, text_layers=4, initializer_factor=6.0)
    processor.tokenizer.padding_side = "left"
    return model, processor


def batch(processor, images: list[Image.Image | None]) -> dict:
    texts = [TEXT_ONLY if image is None else PROMPT for image in images]
    pictures = [image for image in images if image is not None]
    return processor(images=pictures or None, text=texts, return_tensors="pt", padding=True)


def answer(model, inputs: dict, **options) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=4, do_sample=False, **options)[:, -4:]


def test_ineligible_units_are_always_dropped_first(next_model):
    model, processor = next_model
    pixels = processor(images=WIDE, text=PROMPT, return_tensors="pt")["pixel_values"][0, :2]
    adapter = ClipEncoderAdapter(model.model.vision_tower)
    eligible = torch.zeros(144, dtype=torch.bool)
    eligible[30:100] = True
    settings = EncoderStageSettings(keep=40, feature_layer=4)
    with torch.no_grad(), adapter.session() as bound:
        stage = run_encoder_stage(bound, pixels, settings, None, [40, 40], [eligible, None])
    kept = stage.images[0].kept_indices
    assert len(kept) == 40 and bool(eligible[kept].all())
    with pytest.raises(ValueError, match="an image has 70 eligible units, fewer than its budget of 80"):
        with adapter.session() as bound:
            run_encoder_stage(
                bound, pixels, EncoderStageSettings(keep=80, feature_layer=4), None, [80, 80], [eligible, None]
            )


def test_keep_at_or_above_the_stock_tokens_is_the_stock_model(next_model):
    model, processor = next_model
    inputs = batch(processor, [WIDE, SQUARE])
    with torch.no_grad():
        logits = model(**inputs).logits
    stock_answer = answer(model, inputs)
    pruned_processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=pruned_processor, keep=2000):
        pruned = batch(pruned_processor, [WIDE, SQUARE])
        assert torch.equal(pruned["input_ids"], inputs["input_ids"])
        with torch.no_grad():
            assert torch.equal(model(**pruned).logits, logits)
        assert torch.equal(answer(model, pruned), stock_answer)


def test_exact_budgets_per_crop_and_after_layer_1(next_model):
    model, processor = next_model
    processor = copy.deepcopy(processor)
    handle = flowcut.apply(model, processor=processor, keep=KEEP)
    try:
        layout = handle._family.layout((60, 150))
        # Base view + 2 crops, each pruned to T/2 = 32 patches (every crop has more eligible ones).
        assert layout.crop_grid == (1, 2) and layout.crop_keeps == [32, 32, 32]
        inputs = batch(processor, [WIDE, SQUARE])
        assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [96, 160]
        with torch.no_grad():
            model(**inputs)
        trace = handle.last_trace
        assert [tokens[1:] for tokens in trace.image_tokens] == [(96, KEEP), (160, KEEP)]
        crops = trace.images  # WIDE: base + 2 crops, SQUARE: base + 4 crops
        assert [len(crop.kept_indices) for crop in crops] == [32] * 8
        for crop, mask in zip(crops[1:3], layout.eligible, strict=True):
            assert bool(mask[crop.kept_indices].all())  # nothing that unpadding would remove
        assert not bool(layout.eligible[0].all())  # the letterbox rows were there to avoid
    finally:
        handle.remove()


def test_batch_invariance_with_sizes_padding_and_text_only_prompts(next_model):
    model, processor = next_model
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=KEEP):
        alone = [answer(model, batch(processor, [image]))[0] for image in (WIDE, SQUARE)]
        text = answer(model, batch(processor, [None]))[0]
        mixed = answer(model, batch(processor, [SQUARE, None, WIDE]))
        assert torch.equal(mixed[0], alone[1]) and torch.equal(mixed[1], text) and torch.equal(mixed[2], alone[0])


def test_cached_generation_equals_uncached(next_model):
    model, processor = next_model
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=KEEP):
        inputs = batch(processor, [WIDE, SQUARE])
        assert torch.equal(answer(model, inputs), answer(model, inputs, use_cache=False))


def test_remove_restores_stock_and_two_models_keep_their_own_settings(next_model):
    model, processor = next_model
    inputs = batch(processor, [WIDE])
    with torch.no_grad():
        before = model(**inputs).logits
    other, other_processor = build_tiny_llava_next(seed=1, vision_layers=6, text_layers=4)
    first = flowcut.apply(model, processor=copy.deepcopy(processor), keep=KEEP)
    second = flowcut.apply(other, processor=other_processor, keep=32)
    try:
        assert (batch(first.processor, [WIDE])["input_ids"] == model.config.image_token_id).sum() == 96
        assert (batch(other_processor, [WIDE])["input_ids"] == other.config.image_token_id).sum() == 48
    finally:
        first.remove()
        second.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert "get_image_features" not in model.model.__dict__


def test_fastv_keeps_the_stock_tokens_until_layer_1(next_model):
    model, processor = next_model
    processor = copy.deepcopy(processor)
    handle = flowcut.apply(model, processor=processor, keep=KEEP, method="fastv")
    try:
        inputs = batch(processor, [WIDE])
        stock = handle._family.layout((60, 150)).stock_tokens
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == stock
        with torch.no_grad():
            model(**inputs)
        assert handle.last_trace.image_tokens == [(stock, stock, KEEP)]
    finally:
        handle.remove()


def test_clear_errors(next_model):
    model, processor = next_model
    stock_inputs = batch(processor, [WIDE])
    with flowcut.apply(model, keep=KEEP), pytest.raises(ValueError, match="build inputs with the processor passed"):
        model(**stock_inputs)


def test_left_and_right_padding_give_the_same_next_token(next_model):
    from flowcut.tools.evaluate import last_token_logits

    model, processor = next_model
    processor = copy.deepcopy(processor)
    tokens = []
    with flowcut.apply(model, processor=processor, keep=KEEP) as handle, torch.no_grad():
        for side in ("left", "right"):
            processor.tokenizer.padding_side = side
            inputs = batch(processor, [WIDE, None, SQUARE])
            logits = model(**inputs).logits
            kept = handle.last_trace.language_positions
            tokens.append(last_token_logits(logits, inputs["attention_mask"], kept).argmax(-1))
    assert torch.equal(tokens[0], tokens[1])
