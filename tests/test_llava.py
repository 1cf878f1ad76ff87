"""FlowCut on LlavaForConditionalGeneration: SPEC §2 fidelity and every invariant of SPEC §5."""

from __future__ import annotations

import pytest
import torch

import flowcut
from conftest import PROMPT, VISION_OPTIONS, make_image
from flowcut import compat
from flowcut.testing import build_tiny_llava
from reference_impl import reference_flowcut

KEEP = 16
NUM_PATCHES = 144  # 84-px images, 7-px patches: a 12×12 grid


def forward_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False, **kwargs)
    return output[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("keep", [1, 16, 40])
def test_matches_independent_reimplementation_in_float64(attn_implementation, keep):
    model, processor = build_tiny_llava(
        seed=1, dtype=torch.float64, attn_implementation=attn_implementation, **VISION_OPTIONS
    )
    handle = flowcut.apply(model, processor=processor, keep=keep)
    for seed in range(3):
        pixel_values = processor.image_processor(make_image(seed), return_tensors="pt").pixel_values.double()
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values).pooler_output[0]
            expected_indices, expected_hidden, expected_counts = reference_flowcut(
                model.model.vision_tower, pixel_values, keep
            )
            expected_features = model.model.multi_modal_projector(expected_hidden)
        trace = handle.last_trace.images[0]
        assert trace.kept_indices.tolist() == expected_indices.tolist()
        assert trace.tokens_per_layer == expected_counts
        assert torch.allclose(features, expected_features, atol=1e-6, rtol=0)


def test_schedule_and_layers_after_feature_layer_do_not_run(tiny, images):
    model, processor = tiny
    calls = [0] * len(model.model.vision_tower.encoder.layers)
    hooks = [
        layer.register_forward_hook(lambda *_, index=i: calls.__setitem__(index, calls[index] + 1))
        for i, layer in enumerate(model.model.vision_tower.encoder.layers)
    ]
    handle = flowcut.apply(model, processor=processor, keep=KEEP)
    with torch.no_grad():
        model(**processor(images=images[0], text=PROMPT, return_tensors="pt"))
    for hook in hooks:
        hook.remove()
    # 8 layers, features from layer 6 (vision_feature_layer=-2): layers 0–6 run, layer 7 never does.
    assert calls == [1, 1, 1, 1, 1, 1, 1, 0]
    trace = handle.last_trace.images[0]
    assert handle.last_trace.feature_layer == 6
    assert len(trace.tokens_per_layer) == 7
    assert trace.tokens_per_layer[0] == NUM_PATCHES and trace.tokens_per_layer[-1] == KEEP
    # F = 5: only layers 1, 3, 5 may prune; layer 5 (L = 0) always does.
    assert set(trace.prune_layers) <= {1, 3, 5} and trace.prune_layers[-1] == 5
    counts = trace.tokens_per_layer
    assert all(counts[i + 1] == counts[i] for i in range(6) if i not in (1, 3, 5))
    assert trace.entropy_ratios[6] is None and all(0 < r <= 1 for r in trace.entropy_ratios[:6])


def test_exact_budget_and_indices(tiny, images):
    model, processor = tiny
    handle = flowcut.apply(model, processor=processor, keep=KEEP)
    inputs = processor(images=images, text=[PROMPT] * 3, return_tensors="pt", padding=True)
    assert int((inputs.input_ids == model.config.image_token_id).sum()) == 3 * KEEP
    with torch.no_grad():
        output = model(**inputs)
    assert compat.output_image_features(output).shape == (3 * KEEP, model.config.text_config.hidden_size)
    for kept in handle.last_trace.kept_indices:
        assert kept.shape == (KEEP,)
        assert kept.unique().numel() == KEEP
        assert torch.equal(kept, kept.sort().values)
        assert 0 <= int(kept.min()) and int(kept.max()) < NUM_PATCHES


def test_kept_indices_map_to_their_patches(tiny, images):
    """Kept index j carries the features of grid patch j (row-major, CLS excluded).

    With every attention output projection zeroed, tokens no longer mix, so a patch's feature-layer
    state depends on that patch alone; the CLS-view scores still vary (queries and keys are intact).
    The pruned features must then equal the stock tower's features at the kept indices.
    """
    model, processor = tiny
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
    pixel_values = processor.image_processor(images[0], return_tensors="pt").pixel_values
    with torch.no_grad():
        stock = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][0, 1:]
    handle = flowcut.apply(model, keep=KEEP)
    with torch.no_grad():
        pruned = model.model.get_image_features(pixel_values).last_hidden_state[0, 1:]
    kept = handle.last_trace.kept_indices[0]
    assert kept.tolist() != list(range(KEEP))
    assert torch.allclose(pruned, stock[kept], atol=1e-5)
    assert not torch.allclose(pruned, stock[torch.arange(KEEP)], atol=1e-3)


def test_batch_invariance(tiny, images):
    model, processor = tiny
    handle = flowcut.apply(model, processor=processor, keep=KEEP)
    pixel_values = processor.image_processor(images, return_tensors="pt").pixel_values
    with torch.no_grad():
        batched = model.model.get_image_features(pixel_values).pooler_output
        batched_trace = handle.last_trace
        singles = []
        for i in range(3):
            singles.append(model.model.get_image_features(pixel_values[i : i + 1]).pooler_output[0])
            single_trace = handle.last_trace.images[0]
            assert batched_trace.images[i].kept_indices.tolist() == single_trace.kept_indices.tolist()
            assert batched_trace.images[i].tokens_per_layer == single_trace.tokens_per_layer
            assert batched_trace.images[i].entropy_ratios == pytest.approx(single_trace.entropy_ratios, abs=1e-5)
    # The batch really was ragged: the images followed different schedules.
    assert len({tuple(image.tokens_per_layer) for image in batched_trace.images}) > 1
    for batched_features, single_features in zip(batched, singles, strict=True):
        assert torch.allclose(batched_features, single_features, atol=1e-5)
    # Reordering the batch changes nothing either.
    with torch.no_grad():
        reversed_features = model.model.get_image_features(pixel_values.flip(0)).pooler_output
    for a, b in zip(batched, reversed(reversed_features), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_invariance(tiny, images, padding_side):
    model, processor = tiny
    flowcut.apply(model, processor=processor, keep=KEEP)
    prompts = [PROMPT, "USER: <image>\nhow many red objects are there in this picture ? ASSISTANT:"]
    processor.tokenizer.padding_side = padding_side
    batch = processor(images=images[:2], text=prompts, return_tensors="pt", padding=True)
    logits = forward_logits(model, batch)
    for i, prompt in enumerate(prompts):
        single = processor(images=images[i], text=prompt, return_tensors="pt")
        single_logits = forward_logits(model, single)[0, -1]
        last = int(batch.attention_mask[i].nonzero().max())
        assert torch.allclose(logits[i, last], single_logits, atol=1e-4)


def test_batched_generation_equals_single(tiny, images):
    model, processor = tiny
    flowcut.apply(model, processor=processor, keep=KEEP)
    prompts = [PROMPT, "USER: <image>\nhow many red objects are there in this picture ? ASSISTANT:"]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images[:2], text=prompts, return_tensors="pt", padding=True)
    generated = greedy(model, batch)
    for i, prompt in enumerate(prompts):
        single = greedy(model, processor(images=images[i], text=prompt, return_tensors="pt"))
        assert generated[i].tolist() == single[0].tolist()


def test_cached_equals_uncached_greedy(tiny, images):
    model, processor = tiny
    flowcut.apply(model, processor=processor, keep=KEEP)
    inputs = processor(images=images[1], text=PROMPT, return_tensors="pt")
    assert greedy(model, inputs, use_cache=True).tolist() == greedy(model, inputs, use_cache=False).tolist()


@pytest.mark.parametrize("keep", [NUM_PATCHES, 576, 10_000])
def test_keep_all_is_stock(tiny, images, keep):
    model, processor = tiny
    inputs = processor(images=images[:2], text=[PROMPT] * 2, return_tensors="pt")
    stock = forward_logits(model, inputs)
    stock_tokens = greedy(model, inputs)
    handle = flowcut.apply(model, processor=processor, keep=keep)
    pruned_inputs = processor(images=images[:2], text=[PROMPT] * 2, return_tensors="pt")
    assert torch.equal(pruned_inputs.input_ids, inputs.input_ids)
    assert torch.equal(forward_logits(model, pruned_inputs), stock)
    assert torch.equal(greedy(model, pruned_inputs), stock_tokens)
    assert handle.last_trace.kept_indices[0].tolist() == list(range(NUM_PATCHES))


def test_remove_restores_stock(tiny, images):
    model, processor = tiny
    inputs = processor(images=images[0], text=PROMPT, return_tensors="pt")
    stock = forward_logits(model, inputs)
    implementation = compat.attention_implementation(model.model.vision_tower.config)
    with flowcut.apply(model, processor=processor, keep=KEEP) as handle:
        pruned_inputs = processor(images=images[0], text=PROMPT, return_tensors="pt")
        assert int((pruned_inputs.input_ids == model.config.image_token_id).sum()) == KEEP
        pruned = forward_logits(model, pruned_inputs)
        greedy(model, pruned_inputs)
        assert flowcut.get_handle(model) is handle
    assert not handle.active and flowcut.get_handle(model) is None
    assert "get_image_features" not in model.model.__dict__
    assert compat.attention_implementation(model.model.vision_tower.config) == implementation
    assert torch.equal(processor(images=images[0], text=PROMPT, return_tensors="pt").input_ids, inputs.input_ids)
    assert torch.equal(forward_logits(model, inputs), stock)
    assert pruned.shape[1] < stock.shape[1]
    handle.remove()  # idempotent


def test_two_models_hold_their_own_settings(images):
    first, first_processor = build_tiny_llava(seed=0, **VISION_OPTIONS)
    second, second_processor = build_tiny_llava(seed=0, **VISION_OPTIONS)
    plain, plain_processor = build_tiny_llava(seed=0, **VISION_OPTIONS)
    inputs = plain_processor(images=images[0], text=PROMPT, return_tensors="pt")
    stock = forward_logits(plain, inputs)
    first_handle = flowcut.apply(first, processor=first_processor, keep=8)
    second_handle = flowcut.apply(second, processor=second_processor, keep=32)
    forward_logits(first, first_processor(images=images[0], text=PROMPT, return_tensors="pt"))
    forward_logits(second, second_processor(images=images[0], text=PROMPT, return_tensors="pt"))
    assert first_handle.last_trace.kept_indices[0].numel() == 8
    assert second_handle.last_trace.kept_indices[0].numel() == 32
    # The unpruned instance of the same class is untouched.
    assert torch.equal(forward_logits(plain, inputs), stock)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(images, dtype):
    model, processor = build_tiny_llava(seed=0, dtype=dtype, **VISION_OPTIONS)
    handle = flowcut.apply(model, processor=processor, keep=KEEP)
    inputs = processor(images=images[:2], text=[PROMPT] * 2, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    logits = forward_logits(model, inputs)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert [k.numel() for k in handle.last_trace.kept_indices] == [KEEP, KEEP]
    assert greedy(model, inputs).shape == (2, 6)


def test_compat_entry_point(tiny, images):
    model, processor = tiny
    assert flowcut.flowcut(model, target_num=KEEP) is model
    handle = flowcut.get_handle(model)
    assert handle.config.keep == KEEP
    pixel_values = processor.image_processor(images[0], return_tensors="pt").pixel_values
    with torch.no_grad():
        features = model.get_image_features(pixel_values).pooler_output
    assert features[0].shape[0] == KEEP


def test_record_scores_maps_criteria_onto_the_grid(tiny, images):
    model, processor = tiny
    handle = flowcut.apply(model, keep=KEEP, record_scores=True)
    pixel_values = processor.image_processor(images[0], return_tensors="pt").pixel_values
    with torch.no_grad():
        model.model.get_image_features(pixel_values)
    trace = handle.last_trace.images[0]
    assert set(trace.scores) == {"relation", "semantic", "density", "score", "cumulative"}
    first = trace.scores["relation"][0]
    assert first.shape == (NUM_PATCHES,) and torch.isfinite(first).all()
    assert 0.0 < first.sum().item() < 1.0  # the patches' share of CLS attention (CLS holds the rest)
    # After the last prune only the kept patches carry scores.
    last_scored = max(i for i, s in enumerate(trace.scores["cumulative"]) if s is not None)
    alive = torch.isfinite(trace.scores["cumulative"][last_scored]).nonzero().flatten()
    assert trace.tokens_per_layer[last_scored] == alive.numel()
    assert set(trace.kept_indices.tolist()) <= set(alive.tolist())
