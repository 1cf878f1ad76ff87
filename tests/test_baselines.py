"""The method registry and the baselines behind flowcut.apply: defining behaviour on hand-checkable inputs,
exact budgets, batch invariance, and the stock path of ``method="none"``."""

from __future__ import annotations

import pytest
import torch

import flowcut
from flowcut import compat
from flowcut.methods import get_method, method_names
from flowcut.methods.divprune import max_min_diverse
from flowcut.methods.pool import cell_centres, layout_centres, pool_by_layout, pool_grid, pool_layout, pool_patches
from flowcut.methods.visionzip import visionzip_split, visionzip_tokens

KEEP = 16
NUM_PATCHES = 144  # 84-px images, 7-px patches: a 12×12 grid
PRUNING_OPTIONS = [
    {"method": name} for name in ("flowcut", "visionzip", "divprune", "random", "pool", "vispruner", "hiprune")
]
PRUNING_OPTIONS += [{"schedule": "one_shot"}, {"counts": "uniform"}, {"criteria": "relation"}]
PROMPT = "USER: <image>\nwhat ? ASSISTANT:"


def pixels(processor, images) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt").pixel_values


def test_registry_lists_every_method_and_rejects_unknown_names():
    assert method_names() == (
        "flowcut",
        "divprune",
        "fastv",
        "hiprune",
        "none",
        "pool",
        "random",
        "visionzip",
        "vispruner",
    )
    assert flowcut.METHODS == method_names()
    assert all(get_method(name).summary for name in method_names())
    known = "flowcut, divprune, fastv, hiprune, none, pool, random, visionzip, vispruner"
    with pytest.raises(ValueError, match=f"unknown method 'fastvv'; available: {known}$"):
        flowcut.FlowCutConfig(method="fastvv")


def test_flowcut_settings_are_refused_for_other_methods():
    with pytest.raises(ValueError, match="counts='uniform' is a FlowCut setting; it does not apply to 'visionzip'"):
        flowcut.FlowCutConfig(method="visionzip", counts="uniform")
    with pytest.raises(ValueError, match="unknown criteria 'value'; available: all, relation"):
        flowcut.FlowCutConfig(criteria="value")


# -- pool -------------------------------------------------------------------------------------------


def test_pool_grid_is_exact_and_as_square_as_the_budget_allows():
    assert [pool_grid(keep, (24, 24)) for keep in (192, 128, 64, 32, 576)] == [
        (12, 16),
        (8, 16),
        (8, 8),
        (4, 8),
        (24, 24),
    ]
    assert pool_grid(6, (2, 4)) == (2, 3)
    with pytest.raises(ValueError, match="keep=7 cells do not fit a 2×3 patch grid"):
        pool_grid(7, (2, 3))


def test_pool_layout_tiles_budgets_without_a_square_grid_in_rows():
    assert pool_layout(64, (24, 24)) == (8,) * 8 and pool_layout(192, (24, 24)) == (16,) * 12
    assert pool_layout(23, (24, 24)) == (5, 5, 5, 4, 4)  # not a 1×23 strip
    assert pool_layout(8, (6, 8)) == (4, 4)
    assert pool_layout(5, (1, 8)) == (5,)
    with pytest.raises(ValueError, match="keep=0 cells do not fit a 2×3 patch grid"):
        pool_layout(0, (2, 3))


def test_pool_rows_of_uneven_cells():
    patches = torch.arange(16.0).view(1, 16, 1)  # a 4×4 grid holding its own indices
    pooled = pool_by_layout(patches, (4, 4), (2, 1))  # rows 0–1 in two cells, rows 2–3 in one
    assert pooled.flatten().tolist() == [2.5, 4.5, 11.5]
    assert layout_centres((4, 4), (2, 1)).tolist() == [0, 2, 9]


def test_pool_averages_uniform_cells():
    patches = torch.arange(16.0).view(1, 16, 1)  # a 4×4 grid holding its own indices
    pooled = pool_patches(patches, (4, 4), (2, 2))
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert cell_centres((4, 4), (2, 2)).tolist() == [0, 2, 8, 10]


# -- VisionZip ----------------------------------------------------------------------------------------


def test_visionzip_splits_budgets_as_the_paper():
    assert [visionzip_split(keep) for keep in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert visionzip_split(16) == (13, 3)  # 2.5 contextual: halves round up


def test_visionzip_keeps_cls_and_top_attended_patches_and_merges_the_rest_by_key():
    # CLS + 6 patches; hidden state of slot i is the one-hot e_i so every merge is visible.
    hidden = torch.eye(7)
    cls_attention = torch.tensor([0.5, 0.05, 0.3, 0.01, 0.02, 0.1, 0.02])
    keys = torch.tensor([[1.0, 0.0]] * 3 + [[1.0, 0.1], [0.0, 1.0], [0.0, 1.0], [0.1, 1.0]])  # CLS, patches 0–5
    tokens, dominant, targets = visionzip_tokens(hidden, cls_attention, keys, dominant=3, contextual=2)
    assert dominant.tolist() == [1, 4]  # patches 1 and 4 (slots 2 and 5) have the most CLS attention
    # Remaining patches 0, 2, 3, 5; stride 4 // 2 = 2: targets are patches 0 and 3.
    assert targets.tolist() == [0, 3]
    assert torch.equal(tokens[0], hidden[0]) and torch.equal(tokens[1:3], hidden[[2, 5]])
    # Patch 2 (key [1, .1]) joins target 0 (key [1, 0]); patch 5 (key [.1, 1]) joins target 3 (key [0, 1]).
    assert torch.equal(tokens[3], hidden[1] + hidden[3])
    assert torch.equal(tokens[4], hidden[4] + hidden[6])
    assert tokens.shape == (5, 7)


def test_visionzip_on_the_model_equals_the_definition_on_stock_tensors(tiny, images):
    model, processor = tiny
    batch = pixels(processor, images)
    compat.set_attention_implementation(model.config.vision_config, "eager")
    with torch.no_grad():
        stock = model.model.vision_tower(batch, output_attentions=True, output_hidden_states=True)
        # The feature layer is layer -2; its keys come from its own input after its first layer norm.
        layer = [m for m in model.model.vision_tower.modules() if type(m).__name__ == "CLIPEncoderLayer"][-2]
        attention = layer.self_attn
        keys = attention.k_proj(layer.layer_norm1(stock.hidden_states[-3]))
        keys = keys.unflatten(-1, (attention.num_heads, attention.head_dim)).mean(dim=2)
    compat.set_attention_implementation(model.config.vision_config, "sdpa")
    cls_attention = stock.attentions[-2][:, :, 0].sum(dim=1)  # summed over heads
    handle = flowcut.apply(model, keep=KEEP, method="visionzip")
    with torch.no_grad():
        features = model.model.get_image_features(batch).pooler_output
        dominant, contextual = visionzip_split(KEEP)
        for image in range(3):
            tokens, top, targets = visionzip_tokens(
                stock.hidden_states[-2][image], cls_attention[image], keys[image], dominant, contextual
            )
            assert torch.allclose(features[image], model.model.multi_modal_projector(tokens), atol=1e-4)
            kept = handle.last_trace.kept_indices[image]
            assert kept.tolist() == sorted(top.tolist() + targets.tolist()) and len(kept) == KEEP - 1


# -- DivPrune -----------------------------------------------------------------------------------------


def test_divprune_is_greedy_max_min_diverse():
    angles = torch.tensor([0.0, 0.1, 1.5, 3.0, 3.05])  # two tight pairs and one loner, in radians
    features = torch.stack([angles.cos(), angles.sin()], dim=1)
    # The loner (index 2) has the farthest nearest neighbour; index 4 is farthest from it (1.55 rad);
    # then index 0 (1.5 rad from the set) beats index 1 (1.4) and index 3 (0.05).
    assert max_min_diverse(features, 1).tolist() == [2]
    assert max_min_diverse(features, 2).tolist() == [2, 4]
    assert max_min_diverse(features, 3).tolist() == [0, 2, 4]
    assert max_min_diverse(torch.eye(3), 2).tolist() == [0, 1]  # all distances equal: lowest indices


def test_divprune_selects_on_the_stock_projected_tokens(tiny, images):
    model, processor = tiny
    batch = pixels(processor, images)
    with torch.no_grad():
        stock = model.model.get_image_features(batch).pooler_output
        handle = flowcut.apply(model, keep=KEEP, method="divprune")
        features = model.model.get_image_features(batch).pooler_output
    for image, kept in enumerate(handle.last_trace.kept_indices):
        assert kept.tolist() == max_min_diverse(stock[image], KEEP).tolist()
        assert torch.allclose(features[image], stock[image][kept], atol=1e-5)


# -- every method ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", PRUNING_OPTIONS, ids=lambda options: "-".join(map(str, options.values())))
def test_exact_budget_batch_invariance_and_generation(tiny, images, options):
    model, processor = tiny
    batch = pixels(processor, images)
    with flowcut.apply(model, processor=processor, keep=KEEP, **options) as handle:
        with torch.no_grad():
            together = model.model.get_image_features(batch).pooler_output
            alone = [model.model.get_image_features(batch[i : i + 1]).pooler_output[0] for i in range(3)]
        for image in range(3):
            assert together[image].shape == (KEEP, model.config.text_config.hidden_size)
            assert torch.allclose(together[image], alone[image], atol=1e-5)
        assert handle.tokens_per_image == KEEP
        inputs = processor(images=images[0], text=PROMPT, return_tensors="pt")
        assert int((inputs.input_ids == model.config.image_token_id).sum()) == KEEP
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert output.shape[1] == inputs.input_ids.shape[1] + 3


def test_none_is_the_stock_model_whatever_keep_says(tiny, images):
    model, processor = tiny
    inputs = processor(images=images[0], text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        stock = model(**inputs).logits
    with flowcut.apply(model, processor=processor, keep=KEEP, method="none") as handle:
        assert handle.tokens_per_image == NUM_PATCHES
        pruned_inputs = processor(images=images[0], text=PROMPT, return_tensors="pt")
        assert torch.equal(pruned_inputs.input_ids, inputs.input_ids)
        with torch.no_grad():
            assert torch.equal(model(**pruned_inputs).logits, stock)
        assert handle.last_trace.keep == NUM_PATCHES and len(handle.last_trace.kept_indices[0]) == NUM_PATCHES


@pytest.mark.parametrize("method", ["flowcut", "visionzip", "divprune", "random", "pool", "vispruner", "hiprune"])
def test_keeping_every_patch_is_the_stock_model(tiny, images, method):
    model, processor = tiny
    inputs = processor(images=images[1], text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        stock = model(**inputs).logits
        with flowcut.apply(model, processor=processor, keep=NUM_PATCHES, method=method) as handle:
            pruned_inputs = processor(images=images[1], text=PROMPT, return_tensors="pt")
            assert torch.equal(pruned_inputs.input_ids, inputs.input_ids)
            assert torch.equal(model(**pruned_inputs).logits, stock)
            assert handle.tokens_per_image == NUM_PATCHES
