"""Families of fixed-size views pruned by whole cells: Gemma 3 (SigLIP, 4×4 pooling cells, one stage) and InternVL
(InternViT with CLS, 2×2 pixel-shuffle groups, tiles plus a thumbnail, two stages).

Tiny models: Gemma 3 pools 16×16 patches into 16 tokens per image or crop; InternVL shuffles 8×8 patches into 16
tokens per tile. The family battery: exact counts per view and stage, keep-all bit-identical to stock, batch
invariance across images, text-only rows and padding, several images per prompt, cached == uncached, ``remove()``
restores model and processor, clear errors.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import flowcut
from conftest import picture
from flowcut import compat
from flowcut.families.clip import GroupedPatchAdapter, SiglipEncoderAdapter
from flowcut.families.internvl import InternVitAdapter
from flowcut.methods import UnitCall
from flowcut.testing import build_tiny_gemma3, build_tiny_internvl

KEEP = 6
ENCODER_METHODS = ("flowcut", "visionzip", "divprune", "pool", "random", "vispruner", "hiprune")
QUESTION = "what is the colour ?"


@dataclass
class Views:
    name: str
    model: torch.nn.Module
    processor: object
    marker: str
    """What a prompt holds for each image."""
    nested_images: bool
    """Whether the processor takes images as one list per prompt (Gemma 3)."""

    def prompt(self, images: int) -> str:
        markers = " and ".join([self.marker] * images)
        return f"USER: {markers} {QUESTION} ASSISTANT:" if images else f"USER: {QUESTION} ASSISTANT:"

    def inputs(self, processor, prompts: list[list], padding_side: str = "left") -> dict:
        """One row per prompt, each its list of images ([] for a text-only row)."""
        texts = [self.prompt(len(pictures)) for pictures in prompts]
        options = {"return_tensors": "pt", "padding": True, "padding_side": padding_side}
        if not any(prompts):
            return processor(text=texts, **options)
        images = prompts if self.nested_images else [image for pictures in prompts for image in pictures]
        return processor(images=images, text=texts, **options)

    def views(self, image) -> int:
        """The views the stock processor makes of one image (InternVL: its tiles and thumbnail)."""
        return placeholders(self.model, self.inputs(self.processor, [[image]]))[0] // 16


def _build(name: str) -> Views:
    if name == "gemma3":
        model, processor = build_tiny_gemma3()
        views = Views(name, model, processor, "<start_of_image>", True)
    else:
        model, processor = build_tiny_internvl()
        views = Views(name, model, processor, "<IMG_CONTEXT>", False)
    return views


@functools.cache
def built(name: str) -> Views:
    """One tiny model per family for the module (tests copy the processor before adapting it)."""
    return _build(name)


@pytest.fixture(params=("gemma3", "internvl"))
def family(request) -> Views:
    return built(request.param)


FAMILY_METHODS = [("gemma3", method) for method in ENCODER_METHODS] + [
    ("internvl", method) for method in (*ENCODER_METHODS, "fastv")
]
"""Every method each family offers (Gemma 3 refuses FastV: see test_clear_errors)."""


def images() -> tuple:
    return picture(50, 70, 0), picture(80, 40, 1)


def answer(model, batch: dict, **options) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, **options)
    return out[:, batch["input_ids"].shape[1] :]


def encoder_kept(view) -> list[int]:
    """The cells a view's encoder stage kept (the decoder layer's choice depends on the prompt, by design)."""
    return (view.kept_after_prune[-1] if view.kept_after_prune else torch.arange(16)).tolist()


def placeholders(model, batch: dict) -> list[int]:
    return (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()


@pytest.mark.parametrize(("name", "method"), FAMILY_METHODS)
def test_every_view_keeps_exactly_keep_tokens_in_each_stage(name, method):
    family = built(name)
    model, processor = family.model, copy.deepcopy(family.processor)
    first, second = images()
    views = [family.views(first), family.views(second), family.views(first)]
    with flowcut.apply(model, processor=processor, keep=KEEP, method=method) as handle, torch.no_grad():
        two_stage = handle._family.pruner is not None
        assert two_stage == (family.name == "internvl" and method in ("flowcut", "fastv"))
        # entering the language model: 2T per view for FlowCut's two stages, 16 (all) for FastV, else T
        entering = {"flowcut": 2 * KEEP, "fastv": 16}.get(method, KEEP) if two_stage else KEEP
        batch = family.inputs(processor, [[first], [second, first]])
        assert placeholders(model, batch) == [entering * views[0], entering * (views[1] + views[2])]
        if "token_type_ids" in batch:  # Gemma 3's bidirectional image blocks shrink too
            assert batch["token_type_ids"].sum(1).tolist() == placeholders(model, batch)
        model(**batch)
        trace = handle.last_trace
        assert trace.grid_size == (4, 4) and trace.image_tokens == [(16, entering, KEEP)] * sum(views)
        for view in trace.images:
            assert len(view.kept_indices) == KEEP and torch.equal(view.kept_indices, view.kept_indices.unique())
        if method == "flowcut":  # progressive: the last encoder layer runs on the kept cells' patches only
            assert all(view.tokens_per_layer[0] == 16 for view in trace.images)
            assert all(view.tokens_per_layer[-1] == entering for view in trace.images)


def test_a_ratio_keeps_that_share_of_every_views_tokens(family):
    processor = copy.deepcopy(family.processor)
    first = images()[0]
    views = family.views(first)
    with flowcut.apply(family.model, processor=processor, keep=0.25, stages="encoder"):
        assert placeholders(family.model, family.inputs(processor, [[first]])) == [4 * views]
        markers = 2 if family.name == "internvl" else 0  # InternVL's counter counts the start and end markers
        counted = processor._get_num_multimodal_tokens(image_sizes=[(50, 70)]).num_image_tokens
        assert counted == [4 * views + markers]


@pytest.mark.parametrize(("name", "method"), FAMILY_METHODS)
def test_keep_at_or_above_the_stock_tokens_is_the_stock_model(name, method):
    family = built(name)
    model = family.model
    batch = family.inputs(family.processor, [[images()[0]], list(images())])
    with torch.no_grad():
        logits = model(**batch).logits
        tokens = answer(model, batch)
    processor = copy.deepcopy(family.processor)
    with flowcut.apply(model, processor=processor, keep=16, method=method), torch.no_grad():
        pruned = family.inputs(processor, [[images()[0]], list(images())])
        assert torch.equal(pruned["input_ids"], batch["input_ids"])
        assert torch.equal(model(**pruned).logits, logits)
        assert torch.equal(answer(model, pruned), tokens)


@pytest.mark.parametrize(("name", "method"), FAMILY_METHODS)
def test_batch_invariance_and_cached_equals_uncached(name, method):
    family = built(name)
    model, processor = family.model, copy.deepcopy(family.processor)
    first, second = images()
    with flowcut.apply(model, processor=processor, keep=KEEP, method=method) as handle:
        alone = [answer(model, family.inputs(processor, [[image]]))[0] for image in (first, second)]
        kept_alone = []
        for image in (first, second):
            with torch.no_grad():
                model(**family.inputs(processor, [[image]]))
            kept_alone.append([encoder_kept(view) for view in handle.last_trace.images])
        text = answer(model, family.inputs(processor, [[]]))[0]
        mixed_batch = family.inputs(processor, [[second], [], [first]])
        mixed = answer(model, mixed_batch)
        assert torch.equal(mixed[0], alone[1]) and torch.equal(mixed[1], text) and torch.equal(mixed[2], alone[0])
        assert torch.equal(answer(model, mixed_batch, use_cache=False), mixed)
        # The tiny models' greedy answers barely depend on the image; their next-token logits do.
        with torch.no_grad():
            logits_alone = [model(**family.inputs(processor, [[image]])).logits[0, -1] for image in (first, second)]
            logits_mixed = model(**mixed_batch).logits[:, -1]
        assert (logits_alone[0] - logits_alone[1]).abs().max() > 1e-3
        torch.testing.assert_close(logits_mixed[0], logits_alone[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits_mixed[2], logits_alone[0], rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # two images in one prompt: the encoder keeps in each view what it keeps alone
            model(**family.inputs(processor, [[second, first]]))
        assert [encoder_kept(view) for view in handle.last_trace.images] == kept_alone[1] + kept_alone[0]


def test_left_and_right_padding_give_the_same_next_token(family):
    model, processor = family.model, copy.deepcopy(family.processor)
    first, second = images()
    tokens = []
    with flowcut.apply(model, processor=processor, keep=KEEP), torch.no_grad():
        for side in ("left", "right"):
            batch = family.inputs(processor, [[first], [], [second, first]], padding_side=side)
            assert bool(batch["attention_mask"][0, 0 if side == "left" else -1] == 0)  # the short row is padded
            logits = model(**batch).logits
            last = batch["attention_mask"].sum(1) - 1 if side == "right" else torch.full((3,), -1)
            tokens.append(logits[torch.arange(3), last].argmax(-1))
    assert torch.equal(tokens[0], tokens[1])


def test_remove_restores_model_and_processor(family):
    model, processor = family.model, copy.deepcopy(family.processor)
    base_before, processor_before = dict(model.model.__dict__), dict(processor.__dict__)
    language_before = dict(model.model.language_model.__dict__)
    handle = flowcut.apply(model, processor=processor, keep=KEEP)
    handle.remove()
    assert model.model.__dict__.keys() == base_before.keys() and processor.__dict__.keys() == processor_before.keys()
    assert model.model.language_model.__dict__.keys() == language_before.keys()
    first = images()[0]
    assert placeholders(model, family.inputs(processor, [[first]])) == [16 * family.views(first)]


def test_clear_errors(family):
    model = family.model
    stock = family.inputs(family.processor, [[images()[0]]])
    with flowcut.apply(model, processor=copy.deepcopy(family.processor), keep=KEEP, stages="encoder"):
        with (
            torch.no_grad(),
            pytest.raises(ValueError, match="holds 16 image tokens per image, but this model keeps 6"),
        ):
            model(**stock)
    if family.name == "gemma3":
        with pytest.raises(ValueError, match=r"method 'fastv' is not available for Gemma3ForConditionalGeneration \("):
            flowcut.apply(model, processor=copy.deepcopy(family.processor), keep=KEEP, method="fastv")


# -- Gemma 3 -------------------------------------------------------------------------------------


def test_gemma3_cells_are_the_pooling_squares_and_the_unpruned_run_is_the_stock_tower():
    family = built("gemma3")
    model, processor = family.model, family.processor
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    pixels = processor.image_processor(images=list(images()), return_tensors="pt")["pixel_values"]
    with flowcut.apply(model, keep=KEEP) as handle:
        adapter = handle._family.encoder
        assert isinstance(adapter, GroupedPatchAdapter) and isinstance(adapter.patches, SiglipEncoderAdapter)
        assert (adapter.num_patches, adapter.grid_size, adapter.group, adapter.query_slots) == (16, (4, 4), 16, 0)
        with torch.no_grad():
            patches = tower.embeddings(pixels)  # (2, 256, D), row-major over 16×16 patches
            cells = adapter.embed(pixels)
            assert cells.shape == (2, 16, 16 * patches.shape[-1])
            # cell (1, 2) holds patches rows 4..7, columns 8..11, row by row
            square = [16 * row + column for row in range(4, 8) for column in range(8, 12)]
            assert torch.equal(adapter.cell_patches(cells)[:, 1 * 4 + 2], patches[:, square])
            stock = tower(pixel_values=pixels)
            with adapter.session() as bound:
                states = cells
                for index in range(bound.num_layers):
                    states = bound.run_layer(index, states, None, None)
            final = compat.siglip_post_layernorm(tower)(adapter.cell_patches(states))
            torch.testing.assert_close(final[:, 1 * 4 + 2], stock.last_hidden_state[:, square])
            torch.testing.assert_close(handle._family.project(states), projector(stock.last_hidden_state))


def test_gemma3_pan_and_scan_crops_each_keep_their_cells():
    family = built("gemma3")
    model, processor = family.model, copy.deepcopy(family.processor)
    wide = picture(40, 160, 2)
    options = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 16}
    prompt = family.prompt(1)
    stock = processor(images=[[wide]], text=[prompt], return_tensors="pt", **options)
    crops = stock["pixel_values"].shape[0] - 1
    assert crops >= 2 and placeholders(model, stock) == [16 * (1 + crops)]
    with flowcut.apply(model, processor=processor, keep=KEEP) as handle, torch.no_grad():
        batch = processor(images=[[wide]], text=[prompt], return_tensors="pt", **options)
        assert placeholders(model, batch) == [KEEP * (1 + crops)]
        model(**batch)
        assert len(handle.last_trace.images) == 1 + crops


# -- InternVL ------------------------------------------------------------------------------------


def test_internvl_groups_are_the_pixel_shuffles_and_the_unpruned_run_is_the_stock_tower():
    family = built("internvl")
    model, processor = family.model, family.processor
    pixels = processor(images=[images()[0]], text=[family.prompt(1)], return_tensors="pt")["pixel_values"]
    views = pixels.shape[0]
    with torch.no_grad():
        stock = model.model.get_image_features(
            pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
        )
    with flowcut.apply(model, keep=KEEP) as handle:
        adapter = handle._family.encoder
        assert isinstance(adapter.patches, InternVitAdapter) and adapter.query_slots == 1
        assert (adapter.num_patches, adapter.grid_size, adapter.group) == (16, (4, 4), 4)
        with torch.no_grad():
            tower = model.model.vision_tower(pixel_values=pixels)
            shuffled = model.model.pixel_shuffle(tower.last_hidden_state[:, 1:].reshape(views, 8, 8, -1))
            with adapter.session() as bound:
                states = bound.embed(pixels)
                for index in range(bound.num_layers):
                    states = bound.run_layer(index, states, None, None)
            torch.testing.assert_close(states[:, 0, : tower.last_hidden_state.shape[-1]], tower.last_hidden_state[:, 0])
            torch.testing.assert_close(states[:, 1:], shuffled.reshape(views, 16, -1))  # the shuffle's own order
            torch.testing.assert_close(handle._family.project(states[:, 1:]), stock.pooler_output)


def test_internvl_keeps_each_tile_and_its_thumbnail_and_each_video_frame_apart_and_refuses_other_feature_layers():
    family = built("internvl")
    model, processor = family.model, copy.deepcopy(family.processor)
    wide = images()[0]
    with flowcut.apply(model, processor=processor, keep=KEEP, stages="encoder") as handle, torch.no_grad():
        batch = family.inputs(processor, [[wide]])
        model(**batch)
        tiles = batch["pixel_values"]
        assert len(handle.last_trace.images) == tiles.shape[0] == family.views(wide) >= 3  # crops + thumbnail
        for index, view in enumerate(handle.last_trace.images):  # a view keeps what it keeps encoded alone
            _, (alone,) = model.model.get_image_features(tiles[index : index + 1]).media
            assert torch.equal(alone.kept_indices, view.kept_indices)
        # a video: its frames are views of their own (one tile each), each keeps KEEP
        clip = np.stack([np.asarray(picture(40, 40, 10 + frame)) for frame in range(3)])
        text = "USER: <video> what is the colour ? ASSISTANT:"
        stock = family.processor(videos=[clip], text=[text], return_tensors="pt")
        assert placeholders(model, stock) == [3 * 16] and stock["pixel_values"].shape[0] == 3
        video = processor(videos=[clip], text=[text], return_tensors="pt")
        assert placeholders(model, video) == [3 * KEEP]
        assert torch.equal(
            video["input_ids"][video["input_ids"] != model.config.image_token_id],
            stock["input_ids"][stock["input_ids"] != model.config.image_token_id],
        )  # frame text kept
        model(**video)
        assert len(handle.last_trace.images) == 3 and handle.last_trace.image_tokens == [(16, KEEP, KEEP)] * 3
    model.config.vision_feature_layer = -2
    try:
        with pytest.raises(
            ValueError,
            match=r"takes the last layer.s features \(vision_feature_layer=-1\), got vision_feature_layer=-2",
        ):
            flowcut.apply(model, keep=KEEP)
    finally:
        model.config.vision_feature_layer = -1


@pytest.mark.parametrize("name", ["gemma3", "internvl"])
def test_views_of_different_budgets_in_one_pass_are_pruned_as_alone(name):
    """Rows pruned to different budgets become ragged; their padding is masked out of attention (InternViT's
    layers take no mask: FlowCut's attention context brings it) and of every score."""
    family = built(name)
    pixels = family.inputs(family.processor, [list(images())])["pixel_values"][:2]
    with flowcut.apply(family.model, keep=KEEP) as handle, torch.no_grad():
        views = handle._family

        def select(rows: torch.Tensor, keeps: list[int]):
            call = UnitCall(
                views.config, views.encoder, rows, views.encoder.num_layers - 1, keeps, project=views.project
            )
            with views.encoder.session() as encoder:
                return views.method.select_units(dataclasses.replace(call, encoder=encoder))

        both = select(pixels, [3, 9])
        for row, keep in enumerate((3, 9)):
            alone = select(pixels[row : row + 1], [keep])
            assert torch.equal(both.images[row].kept_indices, alone.images[0].kept_indices)
            assert both.images[row].tokens_per_layer == alone.images[0].tokens_per_layer
            lead, count = views.encoder.query_slots, len(alone.images[0].kept_indices)
            torch.testing.assert_close(
                both.hidden_states[row, : lead + count], alone.hidden_states[0, : lead + count], rtol=1e-4, atol=1e-5
            )
        assert both.images[0].tokens_per_layer != both.images[1].tokens_per_layer  # the rows were ragged


def test_the_pruned_tower_refuses_to_make_up_per_patch_outputs():
    family = built("internvl")
    pixels = family.inputs(family.processor, [[images()[0]]])["pixel_values"]
    with flowcut.apply(family.model, keep=KEEP), torch.no_grad():
        with pytest.raises(ValueError, match="output_hidden_states and output_attentions are not available while"):
            family.model.model.get_image_features(pixels, output_hidden_states=True)
