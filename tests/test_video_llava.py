"""FlowCut on VideoLlavaForConditionalGeneration: videos pruned frame by frame, images as in LLaVA-1.5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowcut
from conftest import VISION_OPTIONS, make_image
from flowcut.config import frame_budgets
from flowcut.testing import build_tiny_video_llava
from reference_impl import reference_flowcut

PATCHES = 144  # 84-px frames, 7-px patches: a 12×12 grid
FRAMES = 4
VIDEO_PROMPT = "USER: <video>\nwhat is the colour of the circle ? ASSISTANT:"
IMAGE_PROMPT = "USER: <image>\nwhat is the colour of the circle ? ASSISTANT:"
BOTH_PROMPT = "USER: <image>\n<video>\nwhat is the colour of the circle ? ASSISTANT:"


def make_video(seed: int, frames: int = FRAMES) -> np.ndarray:
    """``(frames, 84, 84, 3)`` frames, each a different noisy picture with bright blocks."""
    return np.stack([np.asarray(make_image(1000 * seed + frame)) for frame in range(frames)])


@pytest.fixture
def tiny_video():
    return build_tiny_video_llava(seed=0, **VISION_OPTIONS)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False, **kwargs)
    return output[:, inputs["input_ids"].shape[1] :]


def test_frame_budgets_split_the_remainder_over_the_first_frames():
    assert frame_budgets(256, 8, 256) == [32] * 8
    assert frame_budgets(260, 8, 256) == [33, 33, 33, 33, 32, 32, 32, 32]
    assert frame_budgets(10, 4, 2) == [2, 2, 2, 2]  # no frame gets more than it has
    with pytest.raises(ValueError, match="less than one token for each"):
        frame_budgets(3, 4, 144)


@pytest.mark.parametrize(("keep", "per_frame"), [(18, [5, 5, 4, 4]), (64, [16] * 4), (0.25, [36] * 4)])
def test_exact_budget_per_video(tiny_video, keep, per_frame):
    model, processor = tiny_video
    handle = flowcut.apply(model, processor=processor, keep=keep)
    inputs = processor(text=[VIDEO_PROMPT], videos=[make_video(0)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == sum(per_frame)
    logits(model, inputs)
    trace = handle.last_trace
    assert trace.images == [] and len(trace.videos) == 1
    assert [len(frame.kept_indices) for frame in trace.videos[0]] == per_frame
    for frame in trace.videos[0]:
        kept = frame.kept_indices.tolist()
        assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < PATCHES


def test_each_frame_matches_the_independent_reimplementation(tiny_video):
    """Every frame keeps what SPEC §2, applied to that frame alone with its share of the budget, keeps."""
    model, processor = tiny_video
    handle = flowcut.apply(model, processor=processor, keep=18)
    video = make_video(2)
    inputs = processor(text=[VIDEO_PROMPT], videos=[video], return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
    start = 0
    for frame, budget in enumerate([5, 5, 4, 4]):
        with torch.no_grad():
            expected, hidden, counts = reference_flowcut(
                model.model.video_tower, inputs["pixel_values_videos"][:, frame], budget
            )
            projected = model.model.multi_modal_projector(hidden)
        assert handle.last_trace.videos[0][frame].kept_indices.tolist() == expected.tolist()
        assert handle.last_trace.videos[0][frame].tokens_per_layer == counts
        assert torch.allclose(features[start : start + budget], projected, atol=1e-5, rtol=0)
        start += budget


def test_keep_all_is_stock(tiny_video):
    model, processor = tiny_video
    inputs = processor(text=[BOTH_PROMPT], images=[make_image(5)], videos=[make_video(1)], return_tensors="pt")
    stock_logits, stock_tokens = logits(model, inputs), greedy(model, inputs)
    stock_count = FRAMES * (PATCHES + 1)  # the stock model hands every frame's CLS over too
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == stock_count
    with flowcut.apply(model, processor=processor, keep=stock_count) as handle:
        adapted = processor(text=[BOTH_PROMPT], images=[make_image(5)], videos=[make_video(1)], return_tensors="pt")
        assert torch.equal(adapted["input_ids"], inputs["input_ids"])
        assert torch.equal(logits(model, adapted), stock_logits)
        assert torch.equal(greedy(model, adapted), stock_tokens)
        assert [len(frame.kept_indices) for frame in handle.last_trace.videos[0]] == [PATCHES] * FRAMES


def test_patch_budget_below_the_stock_count_drops_the_frame_cls(tiny_video):
    """keep = every patch (but fewer than patches + CLS): each frame hands over its patches, not its CLS."""
    model, processor = tiny_video
    flowcut.apply(model, processor=processor, keep=FRAMES * PATCHES)
    inputs = processor(text=[VIDEO_PROMPT], videos=[make_video(1)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == FRAMES * PATCHES
    with torch.no_grad():
        pruned = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
        hidden = model.model.video_tower(inputs["pixel_values_videos"][0], output_hidden_states=True).hidden_states[-2]
        stock_patches = model.model.multi_modal_projector(hidden[:, 1:]).reshape(1, FRAMES * PATCHES, -1)
    assert torch.allclose(pruned, stock_patches, atol=1e-5, rtol=0)


def test_batch_invariance_and_mixed_image_video_batches(tiny_video):
    model, processor = tiny_video
    handle = flowcut.apply(model, processor=processor, keep=18)
    processor.tokenizer.padding_side = "left"
    video_alone = processor(text=[VIDEO_PROMPT], videos=[make_video(3)], return_tensors="pt")
    alone_logits = logits(model, video_alone)[0, -1]
    alone_kept = [frame.kept_indices.tolist() for frame in handle.last_trace.videos[0]]
    image_alone = processor(text=[IMAGE_PROMPT], images=[make_image(7)], return_tensors="pt")
    image_logits = logits(model, image_alone)[0, -1]
    image_kept = handle.last_trace.kept_indices[0].tolist()

    mixed = processor(
        text=[BOTH_PROMPT, VIDEO_PROMPT],
        images=[make_image(7)],
        videos=[make_video(4), make_video(3)],
        padding=True,
        return_tensors="pt",
    )
    mixed_logits = logits(model, mixed)[:, -1]
    trace = handle.last_trace
    assert [frame.kept_indices.tolist() for frame in trace.videos[1]] == alone_kept
    assert trace.kept_indices[0].tolist() == image_kept
    assert torch.allclose(mixed_logits[1], alone_logits, atol=1e-5, rtol=0)

    both = processor(
        text=[IMAGE_PROMPT, VIDEO_PROMPT],
        images=[make_image(7)],
        videos=[make_video(3)],
        padding=True,
        return_tensors="pt",
    )
    both_logits = logits(model, both)[:, -1]
    assert torch.allclose(both_logits[0], image_logits, atol=1e-5, rtol=0)
    assert torch.allclose(both_logits[1], alone_logits, atol=1e-5, rtol=0)


def test_cached_equals_uncached_greedy(tiny_video):
    model, processor = tiny_video
    flowcut.apply(model, processor=processor, keep=18, method="visionzip")
    inputs = processor(text=[BOTH_PROMPT], images=[make_image(2)], videos=[make_video(5)], return_tensors="pt")
    assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))
    flowcut.get_handle(model).remove()
    flowcut.apply(model, processor=processor, keep=18)
    inputs = processor(text=[BOTH_PROMPT], images=[make_image(2)], videos=[make_video(5)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 18
    assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))


@pytest.mark.parametrize("method", ["visionzip", "divprune", "pool", "random", "vispruner", "hiprune"])
def test_baselines_keep_the_video_budget(tiny_video, method):
    model, processor = tiny_video
    handle = flowcut.apply(model, processor=processor, keep=18, method=method)
    inputs = processor(text=[VIDEO_PROMPT], videos=[make_video(0)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 18
    with torch.no_grad():
        features = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
    assert features.shape[:2] == (1, 18)
    greedy(model, inputs)  # the model's own placeholder check passes
    # VisionZip's count includes the CLS token it hands over; its kept indices are the patches among them.
    kept_patches = [4, 4, 3, 3] if method == "visionzip" else [5, 5, 4, 4]
    assert [len(frame.kept_indices) for frame in handle.last_trace.videos[0]] == kept_patches


def test_remove_restores_stock(tiny_video):
    model, processor = tiny_video
    stock = processor(text=[BOTH_PROMPT], images=[make_image(1)], videos=[make_video(1)], return_tensors="pt")
    stock_logits = logits(model, stock)
    handle = flowcut.apply(model, processor=processor, keep=18)
    logits(model, processor(text=[BOTH_PROMPT], images=[make_image(1)], videos=[make_video(1)], return_tensors="pt"))
    handle.remove()
    again = processor(text=[BOTH_PROMPT], images=[make_image(1)], videos=[make_video(1)], return_tensors="pt")
    assert torch.equal(again["input_ids"], stock["input_ids"])
    assert torch.equal(logits(model, again), stock_logits)
    assert "get_video_features" not in model.model.__dict__ and "replace_video_token" not in processor.__dict__


def test_errors(tiny_video):
    model, processor = tiny_video
    stock = processor(text=[VIDEO_PROMPT], videos=[make_video(0)], return_tensors="pt")
    flowcut.apply(model, processor=processor, keep=18)
    with pytest.raises(ValueError, match="580 video tokens per video, but this model keeps 18"):
        logits(model, stock)
    flowcut.get_handle(model).remove()

    flowcut.apply(model, processor=processor, keep=3)
    with pytest.raises(ValueError, match="keep=3 is less than one token for each of the video's 4 frames"):
        processor(text=[VIDEO_PROMPT], videos=[make_video(0)], return_tensors="pt")
    flowcut.get_handle(model).remove()


def test_fastv_prunes_images_and_refuses_videos():
    model, processor = build_tiny_video_llava(seed=0, text_layers=3, **VISION_OPTIONS)
    handle = flowcut.apply(model, processor=processor, keep=18, method="fastv")
    logits(model, processor(text=[IMAGE_PROMPT], images=[make_image(0)], return_tensors="pt"))
    assert len(handle.last_trace.kept_indices[0]) == 18
    with pytest.raises(ValueError, match="covers images only on Video-LLaVA"):
        logits(model, processor(text=[VIDEO_PROMPT], videos=[make_video(0)], return_tensors="pt"))


def test_a_video_trace_holds_only_its_own_passs_images(tiny_video):
    model, processor = tiny_video
    handle = flowcut.apply(model, processor=processor, keep=18)
    logits(model, processor(text=[IMAGE_PROMPT], images=[make_image(1)], return_tensors="pt"))
    assert len(handle.last_trace.images) == 1
    greedy(model, processor(text=[VIDEO_PROMPT], videos=[make_video(1)], return_tensors="pt"))
    assert handle.last_trace.images == [] and len(handle.last_trace.videos) == 1
    with pytest.raises(ValueError, match=r"keep=0\.005 gives the video 3 tokens, fewer than its 4 frames"):
        handle.remove()
        flowcut.apply(model, processor=processor, keep=0.005)
        processor(text=[VIDEO_PROMPT], videos=[make_video(0)], return_tensors="pt")
