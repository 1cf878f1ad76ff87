"""Pruning inside the language model (FastV, and the stage FlowCut's two-stage models use):
the score math by hand, exact budgets, equality with an independent attention computation, and
generation that stays correct with the KV cache under padding."""

from __future__ import annotations

import math

import pytest
import torch

import flowcut
from conftest import VISION_OPTIONS, make_image
from flowcut import compat
from flowcut.core.language_stage import kept_positions, kept_visual_rows, last_token_scores, uniform_budgets
from flowcut.testing import build_tiny_llava

KEEP = 16
NUM_PATCHES = 144
PROMPTS = ["USER: <image>\nwhat is the colour of the circle ? ASSISTANT:", "USER: <image>\nwhat ? ASSISTANT:"]


def test_attention_score_is_the_probability_the_last_token_gives():
    # One head, head_dim 1; positions [text, visual, visual, text(last)]; q_last = 1, keys 0, 1, 2, 0.
    query = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 4, 1)
    key = torch.tensor([0.0, 1.0, 2.0, 0.0]).view(1, 1, 4, 1)
    visual = torch.tensor([[False, True, True, False]])
    visible = torch.ones(1, 4, dtype=torch.bool)
    scores = last_token_scores(query, key, key, 1.0, torch.tensor([3]), visible, visual, "attention")
    total = 2 + math.e + math.e**2
    assert scores[0, 1:3].tolist() == pytest.approx([math.e / total, math.e**2 / total])
    assert scores[0, 0] == scores[0, 3] == float("-inf")
    hidden = last_token_scores(
        query, key, key, 1.0, torch.tensor([3]), visible & ~torch.eye(4, dtype=torch.bool)[0], visual
    )
    assert hidden[0, 1].item() == pytest.approx(math.e / (1 + math.e + math.e**2))  # padding is not a key


def test_grouped_query_heads_share_their_key_head():
    query = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]).view(1, 2, 3, 1)  # two query heads
    key = torch.tensor([0.0, 1.0, 0.0]).view(1, 1, 3, 1)  # one key/value head
    visual = torch.tensor([[False, True, False]])
    scores = last_token_scores(query, key, key, 1.0, torch.tensor([2]), torch.ones(1, 3, dtype=torch.bool), visual)
    expected = (math.e / (2 + math.e) + math.exp(-1) / (2 + math.exp(-1))) / 2
    assert scores[0, 1].item() == pytest.approx(expected)


def test_flowcut_language_score_combines_relation_semantic_and_value_norm():
    query = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 4, 1)
    key = torch.tensor([0.0, 1.0, 2.0, 0.0]).view(1, 1, 4, 1)
    value = torch.tensor([5.0, 2.0, -1.0, 1.0]).view(1, 1, 4, 1)
    visual = torch.tensor([[False, True, True, False]])
    scores = last_token_scores(
        query, key, value, 1.0, torch.tensor([3]), torch.ones(1, 4, dtype=torch.bool), visual, "flowcut"
    )
    relation = [math.e / (math.e + math.e**2), math.e**2 / (math.e + math.e**2)]  # softmax over visual only
    semantic = [math.e**2 / (math.e**2 + math.e**-1), math.e**-1 / (math.e**2 + math.e**-1)]
    assert scores[0, 1:3].tolist() == pytest.approx([(relation[0] + semantic[0]) * 2, (relation[1] + semantic[1]) * 1])
    with pytest.raises(ValueError, match="unknown language-model score 'norm'; available: attention, flowcut"):
        last_token_scores(query, key, value, 1.0, torch.tensor([3]), torch.ones(1, 4, dtype=torch.bool), visual, "norm")


def test_kept_positions_keep_text_and_each_images_best():
    visual = torch.tensor([[False, True, True, True, True, False]])
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.8, 0.2, 0.0]])
    positions, filler = kept_positions(scores, visual, *uniform_budgets(visual, 2, 1))
    assert positions.tolist() == [[0, 2, 3, 5]] and filler is None
    # Images of different lengths and budgets: 3 tokens keep 2, then 1 token keeps 1.
    positions, _ = kept_positions(scores, visual, [[3, 1]], [[2, 1]])
    assert positions.tolist() == [[0, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="not a multiple of 3 per image"):
        uniform_budgets(visual, 3, 1)
    with pytest.raises(ValueError, match="a row holds 4 visual tokens, but its images have 3"):
        kept_positions(scores, visual, [[3]], [[1]])


def test_kept_visual_rows_follow_the_kept_positions_row_major():
    visual = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])
    rows = torch.arange(5).float()[:, None] * 10  # one row per visual token: 0, 10, 20 (row 0); 30, 40 (row 1)
    positions = torch.tensor([[0, 2, 4], [1, 2, 3]])
    mask, kept = kept_visual_rows(visual, rows, positions)
    assert mask.tolist() == [[False, True, False], [True, False, False]]
    assert kept.squeeze(1).tolist() == [10.0, 40.0]


def test_rows_that_keep_fewer_tokens_are_padded_with_hidden_fillers():
    one_and_two_images = torch.tensor(
        [[False, True, True, False, False, False], [False, True, True, True, True, False]]
    )
    scores = torch.tensor([[0.0, 0.2, 0.1, 0.0, 0.0, 0.0], [0.0, 0.1, 0.9, 0.8, 0.2, 0.0]])
    positions, filler = kept_positions(scores, one_and_two_images, *uniform_budgets(one_and_two_images, 2, 1))
    # Row 0 keeps 5 tokens, row 1 only 4: row 1's first dropped visual token (1) pads it, hidden.
    assert positions.tolist() == [[0, 1, 3, 4, 5], [0, 1, 2, 3, 5]]
    assert filler.tolist() == [[False] * 5, [False, True, False, False, False]]


@pytest.fixture
def deep():
    """A tiny LLaVA whose language model has four layers (FastV needs layers after layer 1)."""
    return build_tiny_llava(seed=0, text_layers=4, **VISION_OPTIONS)


def _inputs(processor, count: int = 2):
    images = [make_image(seed) for seed in range(count)]
    return processor(images=images, text=PROMPTS[:count], return_tensors="pt", padding=True)


def test_fastv_keeps_the_tokens_the_last_token_attends_to_in_layer_1(deep):
    model, processor = deep
    processor.tokenizer.padding_side = "left"
    inputs = _inputs(processor)
    compat.set_attention_implementation(model.config.text_config, "eager")
    with torch.no_grad():
        stock = model(**inputs, output_attentions=True)
    received = stock.attentions[1][:, :, -1].mean(1)  # layer 1, last token (left padding), head mean
    handle = flowcut.apply(model, processor=processor, keep=KEEP, method="fastv")
    with torch.no_grad():
        pruned = model(**inputs)
    visual = inputs.input_ids == model.config.image_token_id
    for row in range(2):
        positions = visual[row].nonzero().squeeze(1)
        expected = sorted(received[row, positions].topk(KEEP).indices.tolist())
        assert handle.last_trace.images[row].kept_indices.tolist() == expected
    assert pruned.logits.shape[1] == inputs.input_ids.shape[1] - (NUM_PATCHES - KEEP)
    assert handle.tokens_per_image == KEEP
    assert torch.isfinite(pruned.logits).all()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_fastv_cached_generation_equals_recomputing_the_pruned_prompt(deep, implementation, side):
    model, processor = deep
    compat.set_attention_implementation(model.config.text_config, implementation)
    processor.tokenizer.padding_side = side
    inputs = _inputs(processor)
    flowcut.apply(model, processor=processor, keep=KEEP, method="fastv")
    # Recomputing appends after the prompt, which right padding would put after the pads: one step there.
    steps = 4 if side == "left" else 1
    handle = flowcut.get_handle(model)
    length = inputs.input_ids.shape[1]
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, length:]
        prefill_kept = handle.last_trace.language_positions
        uncached = model.generate(**inputs, max_new_tokens=steps, do_sample=False, use_cache=False)[:, length:]
        assert torch.equal(uncached, generated)
        ids, mask = inputs.input_ids, inputs.attention_mask
        for step in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs.pixel_values, use_cache=False).logits
            kept = handle.last_trace.language_positions
            # The prompt is pruned once, from its own last token; generated tokens all continue.
            assert torch.equal(kept, torch.cat([prefill_kept, torch.arange(length, length + step).expand(2, -1)], 1))
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
            following = logits[torch.arange(2), (kept <= last[:, None]).sum(1) - 1].argmax(-1, keepdim=True)
            assert torch.equal(following, generated[:, step : step + 1])
            ids, mask = torch.cat([ids, following], 1), torch.cat([mask, torch.ones_like(following)], 1)


def test_a_continuation_with_other_images_is_scored_afresh(deep):
    """Only the same prompt with the same images reuses the pruned prompt's selection."""
    model, processor = deep
    first = processor(images=make_image(0), text=PROMPTS[0], return_tensors="pt")
    other = processor(images=make_image(5), text=PROMPTS[0], return_tensors="pt")
    longer = torch.cat([first.input_ids, first.input_ids[:, -1:]], dim=1)

    def continuation(images: dict) -> dict:
        return {"input_ids": longer, "pixel_values": images.pixel_values, "use_cache": False}

    with torch.no_grad():
        with flowcut.apply(model, processor=processor, keep=KEEP, method="fastv") as handle:
            model(**continuation(other))
            fresh = handle.last_trace.language_positions
        with flowcut.apply(model, processor=processor, keep=KEEP, method="fastv") as handle:
            model(**first)
            first_kept = handle.last_trace.language_positions
            model(**continuation(other))
            assert torch.equal(handle.last_trace.language_positions, fresh)
            model(**first)
            model(**continuation(first))  # the same images: the first prompt's selection continues
            assert torch.equal(handle.last_trace.language_positions[:, :-1], first_kept)
        assert not torch.equal(fresh[:, :-1], first_kept)  # the two images do keep different tokens


def test_fastv_is_batch_invariant(deep):
    model, processor = deep
    processor.tokenizer.padding_side = "left"
    inputs = _inputs(processor)
    handle = flowcut.apply(model, processor=processor, keep=KEEP, method="fastv")
    with torch.no_grad():
        together = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
        kept_together = [image.kept_indices.tolist() for image in handle.last_trace.images]
        alone = processor(images=make_image(1), text=PROMPTS[1], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=3, do_sample=False)[:, -3:]
    assert handle.last_trace.images[0].kept_indices.tolist() == kept_together[1]
    assert torch.equal(single[0], together[1])


def test_fastv_batches_prompts_with_different_numbers_of_images(deep):
    """A one-image row keeps fewer tokens than a two-image row: hidden fillers pad it, answers stay its own."""
    model, processor = deep
    processor.tokenizer.padding_side = "left"
    two = "USER: <image><image>\nwhat is the colour of the circle ? ASSISTANT:"
    handle = flowcut.apply(model, processor=processor, keep=KEEP, method="fastv")
    try:
        with torch.no_grad():
            batch = processor(
                images=[make_image(0), make_image(1), make_image(2)],
                text=[two, PROMPTS[1]],
                return_tensors="pt",
                padding=True,
            )
            together = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
            assert [len(image.kept_indices) for image in handle.last_trace.images] == [KEEP] * 3
            pair = processor(images=[make_image(0), make_image(1)], text=two, return_tensors="pt")
            alone = processor(images=make_image(2), text=PROMPTS[1], return_tensors="pt")
            assert torch.equal(model.generate(**pair, max_new_tokens=3, do_sample=False)[0, -3:], together[0])
            assert torch.equal(model.generate(**alone, max_new_tokens=3, do_sample=False)[0, -3:], together[1])
    finally:
        handle.remove()


def test_fastv_with_keep_at_or_above_every_token_is_the_stock_model(deep):
    model, processor = deep
    inputs = _inputs(processor, 1)
    with torch.no_grad():
        stock = model(**inputs).logits
        with flowcut.apply(model, processor=processor, keep=NUM_PATCHES, method="fastv"):
            assert torch.equal(model(**inputs).logits, stock)
        # Removing the method restores the stock model exactly.
        with flowcut.apply(model, processor=processor, keep=KEEP, method="fastv"):
            assert model(**inputs).logits.shape[1] < stock.shape[1]
        assert torch.equal(model(**inputs).logits, stock)


def test_fastv_needs_layers_after_layer_1(tiny):
    with pytest.raises(ValueError, match="after decoder layer 1 needs a later layer; the model has 2"):
        flowcut.apply(tiny[0], keep=KEEP, method="fastv")


def test_the_delegated_attention_sees_its_own_implementation_name():
    # FlashAttention reads its name from the module's config; the recording pass must not hide it.
    from types import SimpleNamespace

    from flowcut.runtime.attention import RECORDING_ATTENTION, _recording_attention

    module = SimpleNamespace(config=SimpleNamespace(_attn_implementation=RECORDING_ATTENTION))
    seen = []

    def delegated(module, *args, **kwargs):
        seen.append(compat.attention_implementation(module.config))
        return "output"

    query = torch.zeros(1, 1, 2, 4)
    result = _recording_attention(
        module, query, query, query, None, flowcut_attention=delegated, flowcut_implementation="flash_attention_2"
    )
    assert result == "output" and seen == ["flash_attention_2"]
    assert compat.attention_implementation(module.config) == RECORDING_ATTENTION


def test_fastv_keeps_the_same_tokens_and_answer_under_left_or_right_padding(deep):
    model, processor = deep
    handle = flowcut.apply(model, processor=processor, keep=KEEP, method="fastv")
    kept, answers = {}, {}
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        inputs = _inputs(processor)
        with torch.no_grad():
            logits = model(**inputs).logits
        positions = handle.last_trace.language_positions
        last = inputs.attention_mask.shape[1] - 1 - inputs.attention_mask.flip(1).argmax(1)
        answers[side] = logits[torch.arange(2), (positions <= last[:, None]).sum(1) - 1].argmax(-1).tolist()
        kept[side] = [image.kept_indices.tolist() for image in handle.last_trace.images]
    assert kept["left"] == kept["right"] and answers["left"] == answers["right"]


def test_fillers_are_hidden_in_every_mask_form():
    from flowcut.runtime.language import _hide_fillers

    filler = torch.tensor([[False, True, False], [False, False, False]])
    states = torch.zeros(2, 1, 4)  # one decoding step after a 3-token pruned prompt
    flash = _hide_fillers(None, filler, states, past=3, flash=True)
    assert flash.tolist() == [[1, 0, 1, 1], [1, 1, 1, 1]]
    additive = _hide_fillers(None, filler, states, past=3, flash=False)  # 0: attend, dtype minimum: hidden
    assert (additive[:, 0, 0] < -1e30).tolist() == [[False, True, False, False], [False] * 4]
    boolean = _hide_fillers(torch.ones(2, 1, 1, 4, dtype=torch.bool), filler, states, past=3, flash=False)
    assert boolean[:, 0, 0].tolist() == [[True, False, True, True], [True] * 4]
    prefill = _hide_fillers(None, filler, torch.zeros(2, 3, 4), past=0, flash=False)
    assert (prefill[:, 0] < -1e30).tolist() == [
        [[False, True, True], [False, True, True], [False, True, False]],  # causal, and slot 1 hidden
        [[False, True, True], [False, False, True], [False, False, False]],
    ]
