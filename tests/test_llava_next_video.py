"""Videos on LLaVA-NeXT-Video and LLaVA-OneVision: frames pruned in the encoder, finished in the language model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import flowcut
from conftest import make_image
from flowcut.testing import build_tiny_llava_next_video, build_tiny_llava_onevision
from reference_impl import reference_flowcut

FRAMES = 4
PATCHES = 144  # 84-px frames, 7-px patches: 12x12; the stock path pools each frame to 6x6 = 36
VIDEO_PROMPT = "USER: <video>\nwhat is the colour of the circle ? ASSISTANT:"
IMAGE_PROMPT = "USER: <image>\nwhat is the colour of the circle ? ASSISTANT:"
BOTH_PROMPT = "USER: <image>\n<video>\nwhat is the colour of the circle ? ASSISTANT:"
FAMILIES = {
    # name: (builder, stock tokens of a 4-frame video: pooled frames, plus OneVision's newline)
    "llava-next-video": (build_tiny_llava_next_video, FRAMES * 36),
    "llava-onevision": (build_tiny_llava_onevision, FRAMES * 36 + 1),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    builder, stock = FAMILIES[request.param]
    model, processor = builder(seed=0, text_layers=4)
    processor.tokenizer.padding_side = "left"
    return request.param, model, processor, stock


def make_video(seed: int) -> np.ndarray:
    return np.stack([np.asarray(make_image(1000 * seed + frame)) for frame in range(FRAMES)])


def video_tokens(model, inputs) -> int:
    return int((inputs["input_ids"] == model.config.video_token_id).sum())


def last_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def answer(model, inputs, **options) -> torch.Tensor:
    # A random model may emit a placeholder id; an uncached pass would then hold one placeholder too many.
    placeholders = [[model.config.image_token_id], [model.config.video_token_id]]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, bad_words_ids=placeholders, **options)
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize(("keep", "frame_keeps"), [(16, [8] * 4), (18, [10, 10, 8, 8])])
def test_exact_budgets_per_video(family, keep, frame_keeps):
    _, model, processor, stock = family
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=keep) as handle:
        inputs = processor(text=[VIDEO_PROMPT], videos=[make_video(0)], return_tensors="pt")
        assert video_tokens(model, inputs) == 2 * keep
        last_logits(model, inputs)
        trace = handle.last_trace
        assert trace.video_tokens == [(stock, 2 * keep, keep)]
        assert [len(frame.kept_indices) for frame in trace.videos[0]] == frame_keeps


def test_frames_keep_what_the_independent_reimplementation_keeps(family):
    name, model, processor, _ = family
    if name != "llava-next-video":
        pytest.skip("the plain re-implementation covers CLIP towers (CLS token)")
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=18) as handle:
        inputs = processor(text=[VIDEO_PROMPT], videos=[make_video(1)], return_tensors="pt")
        last_logits(model, inputs)
        frames = handle.last_trace.videos[0]
        with torch.no_grad():
            features = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
        start = 0
        for frame, frame_keep in enumerate([10, 10, 8, 8]):
            with torch.no_grad():
                expected, hidden, _ = reference_flowcut(
                    model.model.vision_tower, inputs["pixel_values_videos"][:, frame], frame_keep
                )
                projected = model.model.multi_modal_projector(hidden)
            assert frames[frame].kept_indices.tolist() == expected.tolist()
            torch.testing.assert_close(features[start : start + frame_keep], projected, atol=1e-5, rtol=0)
            start += frame_keep


def test_keep_at_or_above_the_stock_count_is_the_stock_model(family):
    _, model, processor, stock = family
    inputs = processor(text=[BOTH_PROMPT], images=[make_image(5)], videos=[make_video(2)], return_tensors="pt")
    stock_logits = last_logits(model, inputs)
    stock_answer = answer(model, inputs)
    pruned_processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=pruned_processor, keep=1000):
        pruned = pruned_processor(
            text=[BOTH_PROMPT], images=[make_image(5)], videos=[make_video(2)], return_tensors="pt"
        )
        assert torch.equal(pruned["input_ids"], inputs["input_ids"]) and video_tokens(model, pruned) == stock
        assert torch.equal(last_logits(model, pruned), stock_logits)
        assert torch.equal(answer(model, pruned), stock_answer)


def test_a_large_budget_keeps_the_pooled_video_and_prunes_in_the_language_model(family):
    _, model, processor, stock = family
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=100) as handle:  # 2T = 200 is not below the stock count
        inputs = processor(text=[VIDEO_PROMPT], videos=[make_video(3)], return_tensors="pt")
        assert video_tokens(model, inputs) == stock
        last_logits(model, inputs)
        assert handle.last_trace.video_tokens == [(stock, stock, 100)]
        assert handle.last_trace.videos is None  # the encoder ran unpruned


def test_batch_invariance_with_image_and_video_rows(family):
    _, model, processor, _ = family
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=16) as handle:
        alone = last_logits(model, processor(text=[VIDEO_PROMPT], videos=[make_video(4)], return_tensors="pt"))[0]
        alone_kept = [frame.kept_indices.tolist() for frame in handle.last_trace.videos[0]]
        image = last_logits(model, processor(text=[IMAGE_PROMPT], images=[make_image(6)], return_tensors="pt"))[0]
        mixed = processor(
            text=[IMAGE_PROMPT, VIDEO_PROMPT, VIDEO_PROMPT],
            images=[make_image(6)],
            videos=[make_video(7), make_video(4)],
            padding=True,
            return_tensors="pt",
        )
        logits = last_logits(model, mixed)
        assert [frame.kept_indices.tolist() for frame in handle.last_trace.videos[1]] == alone_kept
        torch.testing.assert_close(logits[0], image, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[2], alone, atol=1e-4, rtol=1e-4)


def test_cached_generation_equals_uncached(family):
    _, model, processor, _ = family
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=16):
        inputs = processor(
            text=[BOTH_PROMPT, VIDEO_PROMPT],
            images=[make_image(8)],
            videos=[make_video(8), make_video(9)],
            padding=True,
            return_tensors="pt",
        )
        assert torch.equal(answer(model, inputs), answer(model, inputs, use_cache=False))


def test_fastv_ranks_every_stock_video_token(family):
    _, model, processor, stock = family
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=16, method="fastv") as handle:
        inputs = processor(text=[VIDEO_PROMPT], videos=[make_video(1)], return_tensors="pt")
        assert video_tokens(model, inputs) == stock
        last_logits(model, inputs)
        assert handle.last_trace.video_tokens == [(stock, stock, 16)]


def test_remove_restores_and_a_stock_prompt_is_explained(family):
    _, model, processor, stock = family
    inputs = processor(text=[VIDEO_PROMPT], videos=[make_video(2)], return_tensors="pt")
    stock_logits = last_logits(model, inputs)
    pruned_processor = copy.deepcopy(processor)
    handle = flowcut.apply(model, processor=pruned_processor, keep=16)
    with pytest.raises(ValueError, match=f"holds {stock} video tokens for its videos, but this model keeps 32"):
        last_logits(model, inputs)
    handle.remove()
    assert torch.equal(last_logits(model, inputs), stock_logits)
    assert "get_video_features" not in model.model.__dict__
    assert "replace_video_token" not in pruned_processor.__dict__


def test_an_earlier_failed_pass_or_direct_encoding_does_not_leak_into_the_next_generate(family):
    _, model, processor, _ = family
    stock_processor = copy.deepcopy(processor)
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=16) as handle:
        video = processor(text=[VIDEO_PROMPT], videos=[make_video(1)], return_tensors="pt")
        expected = answer(model, video)
        with pytest.raises(ValueError, match="but this model keeps"):
            answer(model, stock_processor(text=[IMAGE_PROMPT], images=[make_image(3)], return_tensors="pt"))
        assert torch.equal(answer(model, video), expected)
        image = processor(text=[IMAGE_PROMPT], images=[make_image(3)], return_tensors="pt")
        with torch.no_grad():
            model.model.get_image_features(image["pixel_values"], image["image_sizes"])
        assert torch.equal(answer(model, video), expected)
        assert handle.last_trace.image_tokens == [] and len(handle.last_trace.video_tokens) == 1


def test_beam_search_is_refused_with_an_explanation(family):
    _, model, processor, _ = family
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=16):
        inputs = processor(text=[VIDEO_PROMPT], videos=[make_video(1)], return_tensors="pt")
        with pytest.raises(ValueError, match="num_beams > 1 or num_return_sequences > 1 repeats them"):
            answer(model, inputs, num_beams=2)
