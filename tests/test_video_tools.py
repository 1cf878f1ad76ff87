"""Videos in the tools: reading frames, the benchmark (Video-LLaVA preset) and the frame-strip visualisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import flowcut.tools.cli
from conftest import VISION_OPTIONS, make_image
from flowcut.testing import build_tiny_video_llava
from flowcut.tools.bench.run import BenchSetting, benchmark
from flowcut.tools.cli import app
from flowcut.tools.video import read_frames, sample_indices

runner = CliRunner()


def frames_array(count: int = 4) -> np.ndarray:
    return np.stack([np.asarray(make_image(seed)) for seed in range(count)])


def test_sample_indices_spread_evenly():
    assert sample_indices(16, 4) == [2, 6, 10, 14]
    assert sample_indices(3, 8) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least one frame"):
        sample_indices(0, 4)


def test_read_frames_from_a_directory_an_array_and_refusals(tmp_path):
    video = frames_array(6)
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in range(len(video)):
        make_image(index).save(folder / f"{index:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    assert np.array_equal(read_frames(folder), video)
    assert np.array_equal(read_frames(folder, 3), video[[1, 3, 5]])
    np.save(tmp_path / "clip.npy", video)
    assert np.array_equal(read_frames(tmp_path / "clip.npy", 2), video[[1, 4]])
    np.save(tmp_path / "flat.npy", video[0])
    with pytest.raises(ValueError, match=r"must hold a \(frames, height, width, 3\) array, got shape \(84, 84, 3\)"):
        read_frames(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match="video not found"):
        read_frames(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        read_frames(tmp_path / "empty")


def test_benchmark_counts_a_videos_tokens_and_frames():
    model, processor = build_tiny_video_llava(seed=0, **VISION_OPTIONS)
    settings = [BenchSetting(None), BenchSetting("flowcut", 16), BenchSetting("visionzip", 16)]
    results = benchmark(
        model, processor, None, "what is it ?", settings, rounds=1, warmup=0, new_tokens=2, video=frames_array()
    )
    assert [result.visual_tokens for result in results] == [4 * 145, 16, 16]
    unpruned, pruned, _ = results
    # Four frames through the 8-layer tower; the pruned frames shrink layer by layer.
    assert unpruned.flops.vision > pruned.flops.vision > 0
    assert unpruned.flops.language > 4 * pruned.flops.language
    assert pruned.timings.scoring and len(pruned.timings.prefill) == 1


def test_cli_bench_runs_the_video_llava_preset(tmp_path):
    arguments = ["bench", "--preset", "video-llava-7b", "--smoke", "--text-layers", "2", "--no-plot", "--frames", "2"]
    options = ["--methods", "flowcut", "--budgets", "64", "--rounds", "1", "--warmup", "0", "--new-tokens", "2"]
    result = runner.invoke(app, [*arguments, *options, "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["results"]
    assert [row["visual_tokens"] for row in rows] == [2 * 257, 64]
    image = runner.invoke(app, [*arguments, "--image", "x.png"])
    assert image.exit_code == 2 and "is a video model" in image.output


def test_frame_strip_figure_and_cli(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from flowcut.tools.viz import visualise_video

    model, processor = build_tiny_video_llava(seed=0, **VISION_OPTIONS)
    figure = visualise_video(model, processor, frames_array(), 18, ["flowcut", "visionzip"], prompt="what is it ?")
    axes = figure.get_axes()
    assert len(axes) == 8  # two methods × four frames
    assert [axis.get_title() for axis in axes[:4]] == [
        f"frame {i}: {k} kept" for i, k in zip(range(1, 5), [5, 5, 4, 4], strict=True)
    ]
    assert "get_video_features" not in model.model.__dict__  # every method was removed again

    np.save(tmp_path / "clip.npy", frames_array())
    monkeypatch.setattr(flowcut.tools.cli, "load_model", lambda *args: (model, processor))
    output = tmp_path / "strip.png"
    arguments = ["viz", "--model", "tiny", "--video", str(tmp_path / "clip.npy"), "--frames", "4", "--keep", "18"]
    result = runner.invoke(app, [*arguments, "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert output.stat().st_size > 1000
    both = runner.invoke(app, [*arguments, "--image", "x.png"])
    assert both.exit_code == 2 and "either --image or --video" in both.output
    layers = runner.invoke(app, [*arguments, "--layers", "2", "--output", str(output)])
    assert layers.exit_code == 2 and "a video is drawn as a strip of frames" in layers.output
    with torch.no_grad():
        assert "get_video_features" not in model.model.__dict__


def test_frame_strip_of_a_two_stage_video_model():
    pytest.importorskip("matplotlib")
    from flowcut.testing import build_tiny_llava_next_video
    from flowcut.tools.viz import visualise_video

    model, processor = build_tiny_llava_next_video(seed=0, text_layers=3)
    figure = visualise_video(model, processor, frames_array(), 16, ["flowcut", "fastv"])
    axes = figure.get_axes()
    assert [axis.get_title() for axis in axes] == [f"frame {i}: {k} kept" for k in ("8", "all") for i in range(1, 5)]
    assert axes[0].get_ylabel() == "flowcut\n32 in, 16 after layer 1\nof 144"
    assert axes[4].get_ylabel() == "fastv\n144 in, 16 after layer 1\nof 144"
