"""Qwen2-VL and Qwen2.5-VL: the SPEC §5 invariants on tiny random models (dynamic resolution, M-RoPE)."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

import flowcut
from conftest import picture
from flowcut.core.encoder_stage import EncoderStageSettings, run_encoder_stage
from flowcut.families.qwen_vision import QwenVisionAdapter
from flowcut.testing import build_tiny_qwen

VERSIONS = ("2", "2.5", "3", "3-moe", "3.5")
QUESTION = "what is the colour ?"


WIDE = picture(48, 64, 0)  # 12x16 patches: 6x8 = 48 merged tokens
TALL = picture(64, 40, 1)  # 16x10 patches: 8x5 = 40 merged tokens


ENCODER_ONLY = ("3.5",)
"""Versions whose language model takes no language-model stage (Qwen3.5: decoder layer 1 is linear attention)."""


@pytest.fixture(scope="module", params=VERSIONS)
def qwen(request):
    model, processor = build_tiny_qwen(request.param)
    processor.tokenizer.padding_side = "left"
    return model, processor


def encoder_keep(model, keep: int) -> int:
    """Merge groups FlowCut's encoder stage keeps for a budget of ``keep``: 2T, or T where the encoder prunes alone."""
    return keep if model.config.model_type == "qwen3_5" else 2 * keep


def prompt(processor, images: int = 1) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": QUESTION}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def inputs_for(processor, rows: list[list[Image.Image]]) -> dict:
    texts = [prompt(processor, len(images)) for images in rows]
    flat = [image for images in rows for image in images]
    return processor(images=flat, text=texts, return_tensors="pt", padding=True)


def answer(model, inputs: dict, new_tokens: int = 4, **options) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **options)
    return out[:, inputs["input_ids"].shape[1] :]


def test_packed_group_encoder_without_pruning_matches_the_stock_tower(qwen):
    """Units, rotary angles, per-image attention and Qwen2.5's windows all as the stock tower has them."""
    model, processor = qwen
    batch = processor(images=[WIDE, TALL], text=[prompt(processor)] * 2, return_tensors="pt", padding=True)
    grid = batch["image_grid_thw"]
    stock = model.model.get_image_features(batch["pixel_values"], grid).pooler_output
    adapter = QwenVisionAdapter(model.model.visual)
    units = [48, 40]
    settings = EncoderStageSettings(keep=48, feature_layer=adapter.num_layers - 1)
    with torch.no_grad(), adapter.session(grid) as bound:
        stage = run_encoder_stage(bound, batch["pixel_values"], settings, units, units)
        merged = bound.merge(stage.hidden_states, stage.counts)
    assert stage.counts == units
    for ours, theirs in zip(merged, stock, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_keep_at_or_above_every_token_is_the_stock_model(qwen):
    model, processor = qwen
    inputs = inputs_for(processor, [[WIDE], [TALL]])
    with torch.no_grad():
        stock_logits = model(**inputs).logits
        stock_answer = answer(model, inputs)
    pruned_processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=pruned_processor, keep=48):
        pruned = inputs_for(pruned_processor, [[WIDE], [TALL]])
        assert torch.equal(pruned["input_ids"], inputs["input_ids"])
        with torch.no_grad():
            assert torch.equal(model(**pruned).logits, stock_logits)
        assert torch.equal(answer(model, pruned), stock_answer)


def test_exact_budgets_two_stages_and_kept_cells(qwen):
    model, processor = qwen
    processor = copy.deepcopy(processor)
    handle = flowcut.apply(model, processor=processor, keep=8)
    try:
        inputs = inputs_for(processor, [[WIDE], [TALL]])
        # The encoder keeps 2T = 16 merge groups per image (Qwen3.5: T): the placeholders the processor wrote.
        entering = encoder_keep(model, 8)
        assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [entering] * 2
        with torch.no_grad():
            model(**inputs)
        trace = handle.last_trace
        assert [image.tokens_per_layer[-1] for image in trace.images] == [entering] * 2
        assert [len(image.kept_indices) for image in trace.images] == [8, 8]  # after decoder layer 1
        assert trace.image_grids == [(6, 8), (8, 5)]
        for image, cells in zip(trace.images, (48, 40), strict=True):
            kept = image.kept_indices
            assert torch.equal(kept, kept.unique()) and 0 <= int(kept.min()) and int(kept.max()) < cells
            assert set(kept.tolist()) <= set(image.kept_after_prune[-1].tolist())
        if entering == 8:  # no language-model stage
            assert trace.language_positions is None and handle._family.pruner is None
            return
        # Layers 0-1 hold the whole prompt, the later ones 8 of each image's 16 visual tokens.
        assert trace.language_positions.shape[1] == inputs["input_ids"].shape[1] - 8
    finally:
        handle.remove()


def test_kept_tokens_keep_their_own_mrope_positions_and_text_continues_unpruned(qwen):
    model, processor = qwen
    stock_inputs = inputs_for(processor, [[WIDE]])
    stock_positions, stock_deltas = model.model.get_rope_index(
        stock_inputs["input_ids"], stock_inputs["mm_token_type_ids"], stock_inputs["image_grid_thw"]
    )
    pruned_processor = copy.deepcopy(processor)
    handle = flowcut.apply(model, processor=pruned_processor, keep=8)
    try:
        inputs = inputs_for(pruned_processor, [[WIDE]])
        seen = {}
        hook = model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
        )
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            hook.remove()
        positions = seen["position_ids"][-3:]
        kept = handle.last_trace.images[0].kept_after_prune[-1]  # the encoder's 16 cells
        image_token = model.config.image_token_id
        stock_image = (stock_inputs["input_ids"][0] == image_token).nonzero().squeeze(1)
        ours_image = (inputs["input_ids"][0] == image_token).nonzero().squeeze(1)
        assert torch.equal(positions[:, 0, ours_image], stock_positions[:, 0, stock_image[kept]])
        stock_text = (stock_inputs["input_ids"][0] != image_token).nonzero().squeeze(1)
        ours_text = (inputs["input_ids"][0] != image_token).nonzero().squeeze(1)
        assert torch.equal(positions[:, 0, ours_text], stock_positions[:, 0, stock_text])
        # A new token continues at the unpruned prompt's next position.
        stock_next = stock_inputs["input_ids"].shape[1] + stock_deltas
        assert torch.equal(inputs["input_ids"].shape[1] + model.model.rope_deltas, stock_next)
    finally:
        handle.remove()


@pytest.mark.parametrize("keep", [8, 0.2])
def test_batch_invariance_across_resolutions_and_padding(qwen, keep):
    model, processor = qwen
    processor = copy.deepcopy(processor)
    handle = flowcut.apply(model, processor=processor, keep=keep)
    try:
        alone = [answer(model, inputs_for(processor, [[image]])) for image in (WIDE, TALL)]
        kept_alone = []
        for image in (WIDE, TALL):
            with torch.no_grad():
                model(**inputs_for(processor, [[image]]))
            kept_alone.append(handle.last_trace.images[0].kept_indices)
        together = answer(model, inputs_for(processor, [[WIDE], [TALL]]))
        assert torch.equal(together[0], alone[0][0]) and torch.equal(together[1], alone[1][0])
        with torch.no_grad():
            model(**inputs_for(processor, [[WIDE], [TALL]]))
        for image, kept in zip(handle.last_trace.images, kept_alone, strict=True):
            assert torch.equal(image.kept_indices, kept)
        if keep == 0.2:  # round(0.2 * 48) = 10 and round(0.2 * 40) = 8 tokens
            assert [len(kept) for kept in kept_alone] == [10, 8]
    finally:
        handle.remove()


def test_several_images_per_prompt_in_a_batch_with_one_image_prompts(qwen):
    model, processor = qwen
    processor = copy.deepcopy(processor)
    handle = flowcut.apply(model, processor=processor, keep=8)
    try:
        single = answer(model, inputs_for(processor, [[TALL]]))
        pair = answer(model, inputs_for(processor, [[WIDE, TALL]]))
        with torch.no_grad():
            model(**inputs_for(processor, [[WIDE, TALL]]))
        assert [len(image.kept_indices) for image in handle.last_trace.images] == [8, 8]
        # Rows keep 16 and 8 visual tokens: the shorter row is padded with hidden fillers.
        mixed = answer(model, inputs_for(processor, [[WIDE, TALL], [TALL]]))
        assert torch.equal(mixed[0], pair[0]) and torch.equal(mixed[1], single[0])
    finally:
        handle.remove()


def test_cached_generation_equals_uncached(qwen):
    model, processor = qwen
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=8):
        inputs = inputs_for(processor, [[WIDE], [TALL]])
        assert torch.equal(answer(model, inputs, 5), answer(model, inputs, 5, use_cache=False))


def test_remove_restores_the_stock_model_and_processor(qwen):
    model, processor = qwen
    inputs = inputs_for(processor, [[WIDE], [TALL]])
    with torch.no_grad():
        before = model(**inputs).logits
    handle = flowcut.apply(model, processor=processor, keep=8)
    try:
        assert (inputs_for(processor, [[WIDE]])["input_ids"] == model.config.image_token_id).sum() == encoder_keep(
            model, 8
        )
    finally:
        handle.remove()
    assert torch.equal(inputs_for(processor, [[WIDE], [TALL]])["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert "get_rope_index" not in model.model.__dict__ and "get_image_features" not in model.model.__dict__


def test_fastv_prunes_only_inside_the_language_model(qwen):
    model, processor = qwen
    processor = copy.deepcopy(processor)
    if model.config.model_type == "qwen3_5":
        with pytest.raises(ValueError, match=r"'fastv' is not available .*Gated DeltaNet .*; available: flowcut"):
            flowcut.apply(model, processor=processor, keep=8, method="fastv")
        assert flowcut.get_handle(model) is None and "get_image_features" not in model.model.__dict__
        return
    handle = flowcut.apply(model, processor=processor, keep=8, method="fastv")
    try:
        inputs = inputs_for(processor, [[WIDE], [TALL]])
        assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [48, 40]
        with torch.no_grad():
            model(**inputs)
        assert [len(image.kept_indices) for image in handle.last_trace.images] == [8, 8]
        assert torch.equal(answer(model, inputs, 4), answer(model, inputs, 4, use_cache=False))
    finally:
        handle.remove()


def test_clear_errors(qwen):
    model, processor = qwen
    stock_inputs = inputs_for(processor, [[WIDE]])
    with flowcut.apply(model, keep=8), pytest.raises(ValueError, match="build inputs with the processor passed to"):
        model(**stock_inputs)
    with pytest.raises(ValueError, match=r"fractional keep .* must be in \(0, 1\)"):
        flowcut.apply(model, keep=1.5)


@pytest.mark.parametrize("version", VERSIONS)
def test_eager_and_sdpa_keep_the_same_cells(version):
    kept = []
    for implementation in ("sdpa", "eager"):
        model, processor = build_tiny_qwen(version, attn_implementation=implementation)
        with flowcut.apply(model, processor=processor, keep=8) as handle, torch.no_grad():
            model(**inputs_for(processor, [[WIDE], [TALL]]))
            kept.append([image.kept_after_prune[-1] for image in handle.last_trace.images])
    for sdpa, eager in zip(*kept, strict=True):
        assert torch.equal(sdpa, eager)


def test_left_and_right_padding_give_the_same_next_token(qwen):
    from flowcut.tools.evaluate import last_token_logits

    model, processor = qwen
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=0.2) as handle, torch.no_grad():
        tokens = []
        for side in ("left", "right"):
            processor.tokenizer.padding_side = side
            inputs = inputs_for(processor, [[WIDE, TALL], [TALL]])
            logits = model(**inputs).logits
            kept = handle.last_trace.language_positions
            tokens.append(last_token_logits(logits, inputs["attention_mask"], kept).argmax(-1))
        processor.tokenizer.padding_side = "left"
    assert torch.equal(tokens[0], tokens[1])


def test_two_models_in_one_process_keep_their_own_settings(qwen):
    model, processor = qwen
    version = "2.5" if "2_5" in type(model).__name__ else "2"
    other, other_processor = build_tiny_qwen(version, seed=1)
    first_processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=first_processor, keep=8):
        alone = answer(model, inputs_for(first_processor, [[WIDE]]))
    with (
        flowcut.apply(model, processor=first_processor, keep=8),
        flowcut.apply(other, processor=other_processor, keep=4),
    ):
        first = inputs_for(first_processor, [[WIDE]])
        second = inputs_for(other_processor, [[WIDE]])
        assert (first["input_ids"] == model.config.image_token_id).sum() == encoder_keep(model, 8)
        assert (second["input_ids"] == other.config.image_token_id).sum() == 8
        answer(other, second)
        assert torch.equal(answer(model, first), alone)
