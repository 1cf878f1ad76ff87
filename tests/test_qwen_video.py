"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 videos: temporal slices pruned as images, ``keep`` per video,
M-RoPE time positions kept."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import flowcut
from conftest import picture
from flowcut.core.encoder_stage import EncoderStageSettings, run_encoder_stage
from flowcut.families.qwen_vision import QwenVisionAdapter
from flowcut.testing import build_tiny_qwen

VERSIONS = ("2", "2.5", "3")
"""Two-stage families with videos (Qwen3-VL: a timestamp before each slice); Qwen3.5 (encoder only) below."""
QUESTION = "what is the colour ?"
CELLS = 48  # 48x64-px frames, 4-px patches, 2x2 merge: 6x8 merged cells per temporal slice


@pytest.fixture(scope="module", params=VERSIONS)
def qwen(request):
    model, processor = build_tiny_qwen(request.param)
    processor.tokenizer.padding_side = "left"
    return model, processor


def make_video(seed: int, frames: int = 4) -> np.ndarray:
    """``frames`` different 48x64 pictures (two temporal slices for 4 frames)."""
    return np.stack([np.asarray(picture(48, 64, 100 * seed + frame)) for frame in range(frames)])


def prompt(processor, kinds: list[str]) -> str:
    content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": QUESTION}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def inputs_for(processor, rows: list[list[str]], images=(), videos=()) -> dict:
    """Rows of media kinds ("image"/"video"); the images and videos in batch order."""
    return processor(
        text=[prompt(processor, kinds) for kinds in rows],
        images=list(images) or None,
        videos=list(videos) or None,
        return_tensors="pt",
        padding=True,
    )


def last_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def answer(model, inputs, **options) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, **options)
    return out[:, inputs["input_ids"].shape[1] :]


def test_slices_encoded_as_images_reproduce_the_stock_video_tower(qwen):
    """Encoding a video's temporal slices as one-slice images is the stock computation (rotary, windows)."""
    model, processor = qwen
    video = inputs_for(processor, [["video"]], videos=[make_video(0)])
    grid = video["video_grid_thw"]
    assert grid.tolist() == [[2, 12, 16]]
    stock = model.model.get_video_features(video["pixel_values_videos"], grid).pooler_output[0]
    adapter = QwenVisionAdapter(model.model.visual)
    settings = EncoderStageSettings(keep=CELLS, feature_layer=adapter.num_layers - 1)
    with torch.no_grad(), adapter.session(torch.tensor([[1, 12, 16], [1, 12, 16]])) as bound:
        stage = run_encoder_stage(bound, video["pixel_values_videos"], settings, [CELLS] * 2, [CELLS] * 2)
        merged = torch.cat(bound.merge(stage.hidden_states, stage.counts))
    torch.testing.assert_close(merged, stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("keep", "budget", "entering"), [(8, 8, 16), (0.25, 24, 48), (5, 5, 10)])
def test_exact_budgets_per_video(qwen, keep, budget, entering):
    model, processor = qwen
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=keep) as handle:
        inputs = inputs_for(processor, [["video"]], videos=[make_video(1)])
        assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == entering
        last_logits(model, inputs)
        trace = handle.last_trace
        assert trace.images == [] and trace.video_tokens == [(2 * CELLS, entering, budget)]
        slices = trace.videos[0]
        # Each slice keeps twice its share of T after the encoder (shares: T // 2, the first one the remainder).
        shares = [budget - budget // 2, budget // 2]
        assert [frame.tokens_per_layer[-1] for frame in slices] == [2 * share for share in shares]
        assert sum(len(frame.kept_indices) for frame in slices) == budget
        for frame in slices:
            kept = frame.kept_indices
            assert torch.equal(kept, kept.unique()) and (len(kept) == 0 or int(kept.max()) < CELLS)
            assert set(kept.tolist()) <= set(frame.kept_after_prune[-1].tolist())


def test_keep_at_or_above_every_token_is_the_stock_model(qwen):
    model, processor = qwen
    inputs = inputs_for(processor, [["image", "video"]], images=[picture(64, 40, 3)], videos=[make_video(2)])
    with torch.no_grad():
        stock_logits = model(**inputs).logits
    stock_answer = answer(model, inputs)
    pruned_processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=pruned_processor, keep=2 * CELLS):
        pruned = inputs_for(pruned_processor, [["image", "video"]], images=[picture(64, 40, 3)], videos=[make_video(2)])
        assert torch.equal(pruned["input_ids"], inputs["input_ids"])
        with torch.no_grad():
            assert torch.equal(model(**pruned).logits, stock_logits)
        assert torch.equal(answer(model, pruned), stock_answer)


def test_kept_video_tokens_keep_their_own_time_and_grid_positions(qwen):
    model, processor = qwen
    stock_inputs = inputs_for(processor, [["video"]], videos=[make_video(4)])
    options = {"second_per_grid_ts": stock_inputs["second_per_grid_ts"]} if "second_per_grid_ts" in stock_inputs else {}
    stock_positions, stock_deltas = model.model.get_rope_index(
        stock_inputs["input_ids"], stock_inputs["mm_token_type_ids"], None, stock_inputs["video_grid_thw"], **options
    )
    pruned_processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=pruned_processor, keep=8) as handle:
        inputs = inputs_for(pruned_processor, [["video"]], videos=[make_video(4)])
        seen = {}
        hook = model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
        )
        try:
            last_logits(model, inputs)
        finally:
            hook.remove()
        positions = seen["position_ids"][-3:]
        slices = handle.last_trace.videos[0]
        kept = torch.cat([frame.kept_after_prune[-1] + index * CELLS for index, frame in enumerate(slices)])
        video_token = model.config.video_token_id
        stock_video = (stock_inputs["input_ids"][0] == video_token).nonzero().squeeze(1)
        ours_video = (inputs["input_ids"][0] == video_token).nonzero().squeeze(1)
        assert torch.equal(positions[:, 0, ours_video], stock_positions[:, 0, stock_video[kept]])
        # Both temporal slices are present: the kept tokens carry two different time positions.
        assert positions[0, 0, ours_video].unique().numel() == 2
        stock_text = (stock_inputs["input_ids"][0] != video_token).nonzero().squeeze(1)
        ours_text = (inputs["input_ids"][0] != video_token).nonzero().squeeze(1)
        assert torch.equal(positions[:, 0, ours_text], stock_positions[:, 0, stock_text])
        stock_next = stock_inputs["input_ids"].shape[1] + stock_deltas
        assert torch.equal(inputs["input_ids"].shape[1] + model.model.rope_deltas, stock_next)


@pytest.mark.parametrize("keep", [8, 0.2])
def test_batch_invariance_with_mixed_image_and_video_rows(qwen, keep):
    model, processor = qwen
    processor = copy.deepcopy(processor)
    image, video, other = picture(64, 40, 5), make_video(6), make_video(7)
    with flowcut.apply(model, processor=processor, keep=keep) as handle:
        alone = last_logits(model, inputs_for(processor, [["video"]], videos=[video]))[0]
        alone_kept = [frame.kept_indices.tolist() for frame in handle.last_trace.videos[0]]
        image_alone = last_logits(model, inputs_for(processor, [["image"]], images=[image]))[0]
        mixed = inputs_for(
            processor, [["image", "video"], ["video"], ["image"]], images=[image, image], videos=[other, video]
        )
        logits = last_logits(model, mixed)
        trace = handle.last_trace
        assert [frame.kept_indices.tolist() for frame in trace.videos[1]] == alone_kept
        torch.testing.assert_close(logits[1], alone, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[2], image_alone, atol=1e-4, rtol=1e-4)


def test_cached_generation_equals_uncached(qwen):
    model, processor = qwen
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=8):
        inputs = inputs_for(
            processor,
            [["video"], ["image", "video"]],
            images=[picture(48, 64, 9)],
            videos=[make_video(8), make_video(9)],
        )
        assert torch.equal(answer(model, inputs), answer(model, inputs, use_cache=False))


def test_fastv_prunes_videos_inside_the_language_model(qwen):
    model, processor = qwen
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=8, method="fastv") as handle:
        inputs = inputs_for(processor, [["video"]], videos=[make_video(1)])
        assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 2 * CELLS
        last_logits(model, inputs)
        assert handle.last_trace.video_tokens == [(2 * CELLS, 2 * CELLS, 8)]
        assert sum(len(frame.kept_indices) for frame in handle.last_trace.videos[0]) == 8


def test_remove_restores_and_errors(qwen):
    model, processor = qwen
    stock = inputs_for(processor, [["video"]], videos=[make_video(3)])
    stock_logits = last_logits(model, stock)
    pruned_processor = copy.deepcopy(processor)
    handle = flowcut.apply(model, processor=pruned_processor, keep=8)
    with pytest.raises(ValueError, match="96 video tokens for its videos, but this model keeps 16"):
        last_logits(model, stock)
    with pytest.raises(ValueError, match="keep=1 is less than one token for each of the video's 2 temporal patches"):
        handle.remove()
        flowcut.apply(model, processor=pruned_processor, keep=1)
        inputs_for(pruned_processor, [["video"]], videos=[make_video(3)])
    flowcut.get_handle(model).remove()
    assert torch.equal(last_logits(model, stock), stock_logits)
    for name in ("get_video_features", "get_image_features", "get_rope_index"):
        assert name not in model.model.__dict__
    assert "replace_video_token" not in pruned_processor.__dict__


def test_precomputed_encodings_carry_their_own_kept_cells(qwen):
    """An encoding passed back in keeps its own cells and positions, whatever was encoded in between."""
    model, processor = qwen
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=8):
        first = inputs_for(processor, [["video"]], videos=[make_video(11)])
        second = inputs_for(processor, [["video"]], videos=[make_video(12)])
        with torch.no_grad():
            expected = model(**first).logits
            encoded = model.model.get_video_features(first["pixel_values_videos"], first["video_grid_thw"])
            model.model.get_video_features(second["pixel_values_videos"], second["video_grid_thw"])
            given = {key: value for key, value in first.items() if key != "pixel_values_videos"}
            again = model(**given, mm_encoder_outputs={"video": encoded}).logits
        assert torch.equal(again, expected)
        with pytest.raises(ValueError, match="num_beams > 1 or num_return_sequences > 1 repeats them"):
            answer(model, first, num_beams=2)


def test_ratio_budget_errors_name_the_ratio_and_traces_name_the_video_grid(qwen):
    model, processor = qwen
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, keep=0.01):
        with pytest.raises(ValueError, match=r"keep=0\.01 gives the video 1 tokens, fewer than its 2 temporal patches"):
            inputs_for(processor, [["video"]], videos=[make_video(3)])
    with flowcut.apply(model, processor=processor, keep=8) as handle:
        last_logits(
            model, inputs_for(processor, [["image", "video"]], images=[picture(64, 40, 3)], videos=[make_video(3)])
        )
        trace = handle.last_trace
        assert trace.image_grids == [(8, 5)] and trace.video_grids == [(6, 8)]


def video_runs(input_ids: torch.Tensor, token: int) -> list[int]:
    """The lengths of the runs of ``token`` in one row."""
    runs, length = [], 0
    for is_token in [*(input_ids == token).tolist(), False]:
        if is_token:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def test_qwen3_video_prompts_keep_their_timestamps_and_give_each_slice_its_run():
    model, processor = build_tiny_qwen("3")
    video_token = model.config.video_token_id
    stock = inputs_for(processor, [["video"]], videos=[make_video(1)])["input_ids"][0]
    assert video_runs(stock, video_token) == [CELLS, CELLS]  # one run per temporal slice, a timestamp before each
    with flowcut.apply(model, processor=copy.deepcopy(processor), keep=8) as handle:
        pruned = inputs_for(handle.processor, [["video"]], videos=[make_video(1)])["input_ids"][0]
    assert video_runs(pruned, video_token) == [8, 8]  # twice each slice's share of T = 8, before the second stage
    assert torch.equal(pruned[pruned != video_token], stock[stock != video_token])  # the timestamps, unchanged


def test_qwen3_5_videos_keep_the_budget_in_the_encoder():
    model, processor = build_tiny_qwen("3.5")
    processor.tokenizer.padding_side = "left"
    image, video, other = picture(64, 40, 5), make_video(6), make_video(7)
    stock_inputs = inputs_for(processor, [["video"]], videos=[video])
    stock_logits = last_logits(model, stock_inputs)
    with flowcut.apply(model, processor=copy.deepcopy(processor), keep=2 * CELLS) as handle:
        assert torch.equal(last_logits(model, inputs_for(handle.processor, [["video"]], videos=[video])), stock_logits)
    with flowcut.apply(model, processor=copy.deepcopy(processor), keep=8) as handle:
        inputs = inputs_for(handle.processor, [["video"]], videos=[video])
        assert video_runs(inputs["input_ids"][0], model.config.video_token_id) == [4, 4]  # each slice its share
        alone = last_logits(model, inputs)[0]
        trace = handle.last_trace
        assert trace.video_tokens == [(2 * CELLS, 8, 8)] and handle._family.pruner is None
        assert [frame.tokens_per_layer[-1] for frame in trace.videos[0]] == [4, 4]
        alone_kept = [frame.kept_indices.tolist() for frame in trace.videos[0]]
        mixed = inputs_for(
            handle.processor, [["image", "video"], ["video"], ["image"]], images=[image, image], videos=[other, video]
        )
        logits = last_logits(model, mixed)
        assert [frame.kept_indices.tolist() for frame in handle.last_trace.videos[1]] == alone_kept
        torch.testing.assert_close(logits[1], alone, atol=1e-4, rtol=1e-4)
