"""Visualisation built from the pruning trace: exact highlighting, figure sections, files, CLI errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import flowcut
from conftest import make_image
from flowcut.testing import save_tiny_llava
from flowcut.tools.cli import app
from flowcut.tools.viz import PRUNED_BRIGHTNESS, highlight, model_view, visualise

pytest.importorskip("matplotlib")
KEEP = 16
GRID = (12, 12)


def test_highlight_darkens_exactly_the_pruned_patches():
    view = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)  # a 4×4 grid of 2-px patches
    shown = highlight(view, torch.tensor([0, 5, 15]), (4, 4))
    for patch in range(16):
        row, column = divmod(patch, 4)
        block = (slice(2 * row, 2 * row + 2), slice(2 * column, 2 * column + 2))
        expected = view[block] if patch in (0, 5, 15) else (view[block] * PRUNED_BRIGHTNESS).astype(np.uint8)
        assert np.array_equal(shown[block], expected), patch


def test_model_view_undoes_the_processor_normalisation(tiny):
    _, processor = tiny
    image = make_image(0)
    pixel_values = processor.image_processor(image, return_tensors="pt").pixel_values[0]
    view = model_view(pixel_values, processor.image_processor.image_mean, processor.image_processor.image_std)
    assert view.shape == (84, 84, 3)
    assert np.abs(view.astype(int) - np.asarray(image).astype(int)).max() <= 1


def test_trace_keeps_the_patches_alive_after_every_prune_step(tiny):
    model, processor = tiny
    handle = flowcut.apply(model, keep=KEEP)
    with torch.no_grad():
        model.model.get_image_features(processor.image_processor(make_image(1), return_tensors="pt").pixel_values)
    record = handle.last_trace.images[0]
    assert len(record.kept_after_prune) == len(record.prune_layers) >= 2
    for layer, kept in zip(record.prune_layers, record.kept_after_prune, strict=True):
        assert len(kept) == record.tokens_per_layer[layer + 1] and kept.tolist() == sorted(set(kept.tolist()))
    for earlier, later in zip(record.kept_after_prune, record.kept_after_prune[1:], strict=False):
        assert set(later.tolist()) < set(earlier.tolist())
    assert torch.equal(record.kept_after_prune[-1], record.kept_indices)


def test_figure_shows_each_prune_step_scores_schedule_and_methods(tiny, tmp_path):
    model, processor = tiny
    figure = visualise(model, processor, make_image(2), KEEP, methods=("flowcut", "random"), prompt="what ?")
    steps, scores, schedule, methods = figure.subfigs
    view = steps.axes[0].images[0].get_array()
    with flowcut.apply(model, keep=KEEP) as handle:
        with torch.no_grad():
            model.model.get_image_features(processor.image_processor(make_image(2), return_tensors="pt").pixel_values)
        record = handle.last_trace.images[0]
    for panel, kept in zip(steps.axes[1:], record.kept_after_prune, strict=False):
        assert np.array_equal(panel.images[0].get_array(), highlight(np.asarray(view), kept, GRID))
    assert len(scores.axes) >= 4 and all(axes.images for axes in scores.axes if axes.get_visible())
    assert schedule.axes[0].get_xlabel() == "encoder layer"
    titles = [axes.get_title() for axes in methods.axes if axes.get_visible()]
    assert titles[0].startswith("flowcut: 16 tokens\nanswer:") and titles[1].startswith("random: 16 tokens")
    for suffix in ("png", "svg"):
        figure.savefig(tmp_path / f"figure.{suffix}")
        assert (tmp_path / f"figure.{suffix}").stat().st_size > 1000
    assert flowcut.get_handle(model) is None  # every method was removed again


def test_unscored_layers_are_refused(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match=r"layers \[7\] were not scored for this image; scored layers: \[0, 1"):
        visualise(model, processor, make_image(0), KEEP, layers=[7])


runner = CliRunner()


@pytest.fixture(scope="module")
def saved(saved_llava):
    return saved_llava


def test_cli_writes_the_figure_and_explains_bad_options(saved):
    arguments = ["viz", "--model", str(saved / "model"), "--image", str(saved / "image.png"), "--keep", "16"]
    output = saved / "out" / "figure.png"
    result = runner.invoke(app, [*arguments, "--method", "flowcut,visionzip", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert output.stat().st_size > 1000 and f"wrote {output}" in result.output.replace("\n", "")
    bad_suffix = runner.invoke(app, [*arguments, "--output", str(saved / "figure.jpg")])
    assert bad_suffix.exit_code == 2 and "--output must end in .png or .svg" in bad_suffix.output
    bad_method = runner.invoke(app, [*arguments, "--method", "flowcut,fastvv"])
    assert bad_method.exit_code == 2 and "unknown method 'fastvv'" in bad_method.output


def test_language_stage_methods_are_drawn_without_a_prompt(saved):
    """FastV prunes in the prefill: without --prompt, viz still runs one and draws FastV's kept tokens."""
    model, output = save_tiny_llava(saved / "deep", seed=0, text_layers=4), saved / "fastv.png"
    arguments = ["viz", "--model", str(model), "--image", str(saved / "image.png"), "--keep", "16"]
    result = runner.invoke(app, [*arguments, "--method", "flowcut,fastv", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert output.stat().st_size > 1000
