"""The selection methods behind flowcut.apply besides full FlowCut: random sampling and the one-shot ablation."""

from __future__ import annotations

import pytest
import torch

import flowcut

KEEP = 16
NUM_PATCHES = 144  # 84-px images, 7-px patches
FEATURE_LAYER = 6  # 8 layers, vision_feature_layer=-2


def pixels(processor, images) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt").pixel_values


def kept_after(model, pixel_values, handle) -> list[list[int]]:
    with torch.no_grad():
        model.model.get_image_features(pixel_values)
    return [indices.tolist() for indices in handle.last_trace.kept_indices]


def test_random_is_exact_seeded_and_batch_invariant(tiny, images):
    model, processor = tiny
    batch = pixels(processor, images)
    handle = flowcut.apply(model, keep=KEEP, method="random")
    together = kept_after(model, batch, handle)
    alone = [kept_after(model, batch[i : i + 1], handle)[0] for i in range(3)]
    reversed_batch = kept_after(model, batch.flip(0), handle)[::-1]
    assert together == alone == reversed_batch
    for indices in together:
        assert len(indices) == KEEP and indices == sorted(set(indices))
        assert 0 <= indices[0] and indices[-1] < NUM_PATCHES
    assert together[0] != together[1] != together[2]  # each image gets its own sample
    handle.remove()
    other_seed = flowcut.apply(model, keep=KEEP, method="random", seed=1)
    assert kept_after(model, batch, other_seed) != together


def test_random_features_are_the_unpruned_feature_layer_rows(tiny, images):
    model, processor = tiny
    batch = pixels(processor, images)
    with torch.no_grad():
        stock = model.model.vision_tower(batch, output_hidden_states=True).hidden_states[-2][:, 1:]
        handle = flowcut.apply(model, keep=KEEP, method="random")
        features = model.model.get_image_features(batch).pooler_output
        for image, kept in enumerate(handle.last_trace.kept_indices):
            expected = model.model.multi_modal_projector(stock[image, kept])
            assert torch.allclose(features[image], expected, atol=1e-5)
    trace = handle.last_trace.images[0]
    assert trace.tokens_per_layer == [NUM_PATCHES] * (FEATURE_LAYER + 1) and trace.prune_layers == [FEATURE_LAYER]


def test_one_shot_prunes_once_by_the_last_layer_score_alone(tiny, images):
    model, processor = tiny
    handle = flowcut.apply(model, keep=KEEP, schedule="one_shot", record_scores=True)
    kept = kept_after(model, pixels(processor, images), handle)
    last_prune_layer = FEATURE_LAYER - 1
    for image, trace in enumerate(handle.last_trace.images):
        assert trace.prune_layers == [last_prune_layer]
        assert trace.tokens_per_layer == [NUM_PATCHES] * FEATURE_LAYER + [KEEP]
        assert [r is not None for r in trace.entropy_ratios] == [i == last_prune_layer for i in range(7)]
        score = trace.scores["score"][last_prune_layer]
        assert torch.equal(trace.scores["cumulative"][last_prune_layer], score)  # no history
        assert kept[image] == sorted(torch.topk(score, KEEP).indices.tolist())


def test_one_shot_differs_from_progressive(tiny, images):
    model, processor = tiny
    batch = pixels(processor, images)
    with flowcut.apply(model, keep=KEEP) as progressive:
        progressive_kept = kept_after(model, batch, progressive)
    with flowcut.apply(model, keep=KEEP, schedule="one_shot") as one_shot:
        assert kept_after(model, batch, one_shot) != progressive_kept


def test_uniform_counts_prune_in_equal_steps(tiny, images):
    model, processor = tiny
    handle = flowcut.apply(model, keep=KEEP, counts="uniform")
    kept_after(model, pixels(processor, images), handle)
    # F = 5, interval 2: prunes after layers 1, 3, 5; 128 above keep -> 43, 42 (42.5, half to even), 43.
    for trace in handle.last_trace.images:
        assert trace.prune_layers == [1, 3, 5]
        assert trace.tokens_per_layer == [144, 144, 101, 101, 59, 59, 16]


def test_relation_only_scores_by_cls_attention_alone(tiny, images):
    model, processor = tiny
    handle = flowcut.apply(model, keep=KEEP, criteria="relation", record_scores=True)
    kept_after(model, pixels(processor, images), handle)
    for trace in handle.last_trace.images:
        first = trace.prune_layers[0]
        relation = trace.scores["relation"][first]
        assert torch.allclose(trace.scores["score"][first], relation / relation.sum(), atol=1e-6)


def test_ema_weight_zero_turns_the_cumulative_score_off(tiny, images):
    model, processor = tiny
    handle = flowcut.apply(model, keep=KEEP, ema_weight=0.0, record_scores=True)
    kept_after(model, pixels(processor, images), handle)
    for trace in handle.last_trace.images:
        for layer in trace.prune_layers[1:]:
            cumulative, score = trace.scores["cumulative"][layer], trace.scores["score"][layer]
            torch.testing.assert_close(cumulative, score, rtol=0, atol=0, equal_nan=True)  # NaN: pruned


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"schedule": "twice"}, "unknown schedule 'twice'; available: progressive, one_shot"),
        (
            {"method": "random", "schedule": "one_shot"},
            "schedule='one_shot' is a FlowCut setting; it does not apply to 'random'",
        ),
    ],
)
def test_schedule_errors(options, message):
    with pytest.raises(ValueError, match=message):
        flowcut.FlowCutConfig(keep=8, **options)


def test_two_stage_families_offer_the_methods_whose_needs_they_meet():
    from flowcut.methods import (
        TWO_STAGE_REASON,
        Method,
        Stages,
        available_method,
        get_method,
        method_names,
        stages,
        two_stage_methods,
    )

    selectors = ["flowcut", "divprune", "hiprune", "pool", "random", "visionzip", "vispruner"]
    assert [name for name in method_names() if get_method(name).selects_units] == selectors
    # unit selectors, language-model methods, unpruned: every registered method today
    assert two_stage_methods() == method_names()

    class WholeGridOnly(Method):  # an encoder method without a unit stage (not registered)
        name = "whole-grid-only"

    assert not WholeGridOnly().selects_units
    assert stages(WholeGridOnly()) == Stages(encoder=False, language=False)
    with pytest.raises(NotImplementedError, match="method 'whole-grid-only' has no encoder stage for two-stage"):
        WholeGridOnly().select_units(None)
    with pytest.raises(ValueError, match=r"not available for Model \(.*needs one whole patch grid per image\)"):
        available_method("pool", ("none",), "Model", TWO_STAGE_REASON)
