"""The encoder-stage baselines (VisionZip, DivPrune, random, pool) on the two-stage families: LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL, images and videos.

They keep ``T`` in the encoder (each crop, frame or temporal slice its share) and leave the language
model unpruned; the SPEC §5 invariants hold as for FlowCut.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import flowcut
from conftest import make_image, picture
from flowcut.config import frame_budgets, unit_shares
from flowcut.families.clip import ClipEncoderAdapter
from flowcut.methods import UnitCall, get_method, stages
from flowcut.methods.divprune import max_min_diverse
from flowcut.methods.pool import cell_centres, pool_patches
from flowcut.methods.random_sample import random_patches
from flowcut.testing import (
    build_tiny_llava_next,
    build_tiny_llava_next_video,
    build_tiny_llava_onevision,
    build_tiny_qwen,
)

METHODS = ("visionzip", "divprune", "random", "pool", "vispruner", "hiprune")
ENCODER_BUDGET = (*METHODS, "flowcut:encoder")
"""Every way the encoder stage alone keeps the budget: the baselines, and FlowCut with ``stages="encoder"``."""


def method_options(spec: str) -> dict:
    """``"flowcut:encoder"`` -> FlowCut in encoder-only mode; a plain name -> that method."""
    name, _, mode = spec.partition(":")
    return {"method": name, "stages": mode} if mode else {"method": name}


LLAVA_PROMPT = "USER: <image>\nwhat is the colour ? ASSISTANT:"
LLAVA_TEXT_ONLY = "USER: what is the colour ? ASSISTANT:"


@dataclass
class Family:
    name: str
    model: torch.nn.Module
    processor: object
    keep: int
    images: tuple[Image.Image, Image.Image]

    @property
    def is_qwen(self) -> bool:
        return self.name.startswith("qwen")

    def text(self, images: int) -> str:
        if not self.is_qwen:
            return LLAVA_PROMPT if images else LLAVA_TEXT_ONLY
        content = [{"type": "image"}] * images + [{"type": "text", "text": "what is the colour ?"}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def inputs(self, processor, images: list[Image.Image | None]) -> dict:
        texts = [self.text(int(image is not None)) for image in images]
        pictures = [image for image in images if image is not None]
        return processor(images=pictures or None, text=texts, return_tensors="pt", padding=True)


def _build(name: str) -> Family:
    if name == "llava-next":
        model, processor = build_tiny_llava_next(vision_layers=6, text_layers=4, initializer_factor=6.0)
    elif name == "llava-onevision":
        model, processor = build_tiny_llava_onevision(text_layers=4)
    else:
        model, processor = build_tiny_qwen(name.removeprefix("qwen"))
    processor.tokenizer.padding_side = "left"
    if name.startswith("qwen"):  # 6x8 and 8x5 merged cells
        return Family(name, model, processor, 8, (picture(48, 64, 0), picture(64, 40, 1)))
    return Family(name, model, processor, 64, (picture(60, 150, 0), picture(100, 90, 1)))  # 1x2 and 2x2 crops


@pytest.fixture(scope="module", params=("llava-next", "llava-onevision", "qwen2", "qwen2.5", "qwen3"))
def family(request) -> Family:
    return _build(request.param)


def answer(model, inputs: dict, **options) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, **options)
    return out[:, inputs["input_ids"].shape[1] :]


def test_the_two_stage_split_is_declared_by_each_method():
    assert stages(get_method("flowcut")) == flowcut.methods.Stages(encoder=True, language=True)
    for name in METHODS:
        assert stages(get_method(name)).encoder_keeps_budget
        assert stages(get_method(name), "encoder") == stages(get_method(name))
    assert stages(get_method("flowcut"), "encoder").encoder_keeps_budget
    with pytest.raises(ValueError, match="'fastv' prunes only inside the language model; stages='encoder' needs"):
        flowcut.FlowCutConfig(method="fastv", stages="encoder")
    assert stages(get_method("fastv")) == flowcut.methods.Stages(encoder=False, language=True)
    assert stages(get_method("none")) == flowcut.methods.Stages(encoder=False, language=False)


def test_crop_shares_follow_the_sizes_alone():
    assert unit_shares(64, [144, 144, 72]) == [26, 26, 12]
    assert unit_shares(2, [144, 144, 144, 0]) == [1, 1, 0, 0]
    assert unit_shares(500, [144, 100]) == [144, 100]
    assert sum(unit_shares(97, [144, 130, 130, 7, 0])) == 97


@pytest.mark.parametrize("method", ENCODER_BUDGET)
def test_exact_budget_in_the_encoder_and_no_language_stage(family, method):
    processor = copy.deepcopy(family.processor)
    handle = flowcut.apply(family.model, processor=processor, keep=family.keep, **method_options(method))
    try:
        assert handle._family.pruner is None  # nothing prunes inside the language model
        inputs = family.inputs(processor, list(family.images))
        token_id = family.model.config.image_token_id
        assert (inputs["input_ids"] == token_id).sum(1).tolist() == [family.keep, family.keep]
        with torch.no_grad():
            family.model(**inputs)
        trace = handle.last_trace
        assert [tokens[1:] for tokens in trace.image_tokens] == [(family.keep, family.keep)] * 2
        for image in trace.images:
            kept = image.kept_indices
            assert torch.equal(kept, kept.unique())  # unique and ascending
        if family.is_qwen:
            assert [len(image.kept_indices) for image in trace.images] == [family.keep] * 2
            return
        crops = iter(trace.images)
        for size in ((60, 150), (100, 90)):
            layout = handle._family.layout(size)
            sizes = [handle._family.encoder.num_patches] + [int(mask.sum()) for mask in layout.eligible]
            assert layout.crop_keeps == unit_shares(family.keep, sizes)
            masks = [None, *layout.eligible]
            for share, mask in zip(layout.crop_keeps, masks, strict=True):
                if share == 0:
                    continue
                crop = next(crops)
                assert len(crop.kept_indices) == share
                assert mask is None or bool(mask[crop.kept_indices].all())  # never a unit unpadding removes
    finally:
        handle.remove()


@pytest.mark.parametrize("method", ENCODER_BUDGET)
def test_batch_invariance_and_cached_equals_uncached(family, method):
    processor = copy.deepcopy(family.processor)
    first, second = family.images
    with flowcut.apply(family.model, processor=processor, keep=family.keep, **method_options(method)):
        alone = [answer(family.model, family.inputs(processor, [image]))[0] for image in (first, second)]
        text = answer(family.model, family.inputs(processor, [None]))[0]
        mixed_inputs = family.inputs(processor, [second, None, first])
        mixed = answer(family.model, mixed_inputs)
        assert torch.equal(mixed[0], alone[1]) and torch.equal(mixed[1], text) and torch.equal(mixed[2], alone[0])
        assert torch.equal(answer(family.model, mixed_inputs, use_cache=False), mixed)


@pytest.mark.parametrize("method", ENCODER_BUDGET)
def test_left_and_right_padding_give_the_same_next_token(family, method):
    processor = copy.deepcopy(family.processor)
    first, second = family.images
    tokens = []
    with flowcut.apply(family.model, processor=processor, keep=family.keep, **method_options(method)), torch.no_grad():
        for side in ("left", "right"):
            processor.tokenizer.padding_side = side
            inputs = family.inputs(processor, [first, None, second])
            logits = family.model(**inputs).logits
            last = inputs["attention_mask"].sum(1) - 1 if side == "right" else torch.full((3,), -1)
            tokens.append(logits[torch.arange(3), last].argmax(-1))
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("method", ENCODER_BUDGET)
def test_keep_at_or_above_the_stock_tokens_is_the_stock_model(family, method):
    inputs = family.inputs(family.processor, list(family.images))
    with torch.no_grad():
        logits = family.model(**inputs).logits
    processor = copy.deepcopy(family.processor)
    with flowcut.apply(family.model, processor=processor, keep=5000, **method_options(method)), torch.no_grad():
        pruned = family.inputs(processor, list(family.images))
        assert torch.equal(pruned["input_ids"], inputs["input_ids"])
        assert torch.equal(family.model(**pruned).logits, logits)


# -- the defining steps against the stock tower ----------------------------------------------------


@pytest.fixture(scope="module")
def next_crops():
    family = _build("llava-next")
    pixels = family.processor(images=family.images[0], text=LLAVA_PROMPT, return_tensors="pt")["pixel_values"][0]
    tower = family.model.model.vision_tower
    with torch.no_grad():
        stock = tower(pixels, output_hidden_states=True).hidden_states[-2]  # the feature layer (-2)
    eligible = torch.zeros(144, dtype=torch.bool)
    eligible[30:100] = True
    return family, pixels[:2], stock[:2], eligible


def select(family: Family, method: str, pixels: torch.Tensor, keeps: list[int], eligible: list) -> object:
    encoder = ClipEncoderAdapter(family.model.model.vision_tower)
    call = UnitCall(
        flowcut.FlowCutConfig(keep=max(keeps), method=method),
        encoder,
        pixels,
        encoder.num_layers - 2,
        keeps,
        eligible=eligible,
        project=family.model.model.multi_modal_projector,
    )
    with torch.no_grad(), encoder.session() as bound:
        return get_method(method).select_units(dataclasses.replace(call, encoder=bound))


def test_divprune_units_are_the_max_min_picks_of_the_stock_projection(next_crops):
    family, pixels, stock, eligible = next_crops
    stage = select(family, "divprune", pixels, [20, 12], [None, eligible])
    with torch.no_grad():
        projected = family.model.model.multi_modal_projector(stock[:, 1:])
    assert torch.equal(stage.images[0].kept_indices, max_min_diverse(projected[0], 20))
    candidates = eligible.nonzero().squeeze(1)
    assert torch.equal(stage.images[1].kept_indices, candidates[max_min_diverse(projected[1, candidates], 12)])
    kept = stage.images[0].kept_indices
    torch.testing.assert_close(stage.hidden_states[0, 1:21], stock[0, 1 + kept], atol=1e-5, rtol=1e-5)


def test_random_units_are_seeded_by_the_row_pixels_among_the_candidates(next_crops):
    family, pixels, _, eligible = next_crops
    stage = select(family, "random", pixels, [20, 12], [None, eligible])
    assert torch.equal(stage.images[0].kept_indices, random_patches(pixels[0], 144, 20, 0))
    second = stage.images[1].kept_indices
    assert torch.equal(second, random_patches(pixels[1], 144, 12, 0, eligible.nonzero().squeeze(1)))
    assert bool(eligible[second].all())


def test_visionzip_units_are_dominant_states_and_contextual_merges_at_their_targets(next_crops):
    family, pixels, stock, eligible = next_crops
    keep = 16  # 13 dominant units + 3 contextual tokens
    stage = select(family, "visionzip", pixels, [keep, keep], [None, eligible])
    for row in range(2):
        kept = stage.images[row].kept_indices
        assert len(kept) == keep and torch.equal(kept, kept.unique())
        tokens = stage.hidden_states[row, 1 : 1 + keep]
        same = torch.isclose(tokens, stock[row, 1 + kept], atol=1e-5, rtol=1e-5).all(dim=-1)
        assert int(same.sum()) == 13  # the dominant units, as the tower computed them; 3 merged tokens
    assert bool(eligible[stage.images[1].kept_indices].all())


def test_pool_cells_average_each_rows_eligible_rectangle(next_crops):
    family, pixels, stock, _ = next_crops
    rectangle = torch.zeros(144, dtype=torch.bool)
    rectangle[24:96] = True  # patch rows 2–7 of the 12×12 crop, as unpadding leaves them
    stage = select(family, "pool", pixels, [16, 12], [None, rectangle])
    assert torch.equal(stage.images[0].kept_indices, cell_centres((12, 12), (4, 4)))
    expected = pool_patches(stock[:1, 1:], (12, 12), (4, 4))[0]
    torch.testing.assert_close(stage.hidden_states[0, 1:17], expected, atol=1e-5, rtol=1e-5)
    # 12 cells on the 6×12 rectangle: 2×6, each cell standing at its centre patch of the crop
    assert torch.equal(stage.images[1].kept_indices, 24 + cell_centres((6, 12), (2, 6)))
    expected = pool_patches(stock[1:, 25:97], (6, 12), (2, 6))[0]
    torch.testing.assert_close(stage.hidden_states[1, 1:13], expected, atol=1e-5, rtol=1e-5)


# -- videos ----------------------------------------------------------------------------------------


def llava_video(seed: int) -> np.ndarray:
    return np.stack([np.asarray(make_image(1000 * seed + frame)) for frame in range(4)])


@pytest.mark.parametrize("method", ENCODER_BUDGET)
@pytest.mark.parametrize("builder", [build_tiny_llava_next_video, build_tiny_llava_onevision])
def test_llava_videos_keep_each_frames_share(builder, method):
    model, processor = builder(seed=0, text_layers=4)
    processor.tokenizer.padding_side = "left"
    prompt = "USER: <video>\nwhat is the colour of the circle ? ASSISTANT:"
    with flowcut.apply(model, processor=processor, keep=18, **method_options(method)) as handle:
        inputs = processor(videos=[llava_video(0), llava_video(1)], text=[prompt, prompt], return_tensors="pt")
        assert (inputs["input_ids"] == model.config.video_token_id).sum(1).tolist() == [18, 18]
        cached = answer(model, inputs, bad_words_ids=[[model.config.video_token_id]])
        frames = handle.last_trace.videos
        assert [[len(frame.kept_indices) for frame in video] for video in frames] == [frame_budgets(18, 4, 144)] * 2
        assert handle.last_trace.video_tokens[0][1:] == (18, 18)
        uncached = answer(model, inputs, bad_words_ids=[[model.config.video_token_id]], use_cache=False)
        assert torch.equal(cached, uncached)


@pytest.mark.parametrize("method", ENCODER_BUDGET)
def test_qwen_videos_keep_each_temporal_slices_share(method):
    model, processor = build_tiny_qwen("2.5")
    video = np.stack([np.asarray(picture(48, 64, frame)) for frame in range(4)])  # two temporal slices
    content = [{"type": "video"}, {"type": "text", "text": "what is the colour ?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    with flowcut.apply(model, processor=processor, keep=9, **method_options(method)) as handle:
        inputs = processor(videos=[video], text=[text], return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 9
        cached = answer(model, inputs)
        assert [len(part.kept_indices) for part in handle.last_trace.videos[0]] == [5, 4]
        assert torch.equal(answer(model, inputs, use_cache=False), cached)
