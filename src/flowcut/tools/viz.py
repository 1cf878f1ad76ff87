"""Pictures of what a pruning method keeps, built from the pruning trace alone (no second scorer).

One figure per image: the image as the model saw it with the kept patches after each prune step,
heat maps of FlowCut's criteria and cumulative score at chosen layers, the CLS-attention entropy
and live token count per layer (the curve that drives the adaptive schedule), and, when several
methods are given, their kept patches side by side. matplotlib is imported only here
(``pip install 'flowcut-vlm[viz]'``); figures are ``matplotlib.figure.Figure`` objects, made
without pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flowcut.trace import PruningTrace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PRUNED_BRIGHTNESS = 0.25
"""Pruned patches are drawn at this fraction of their brightness; kept patches are untouched."""

CRITERIA = (("relation", "relation (CLS attention)"), ("semantic", "semantic"), ("density", "value norm"))
CRITERIA += (("cumulative", "cumulative score"),)
MAX_STEP_PANELS = 6


def model_view(pixel_values: torch.Tensor, image_mean: Sequence[float], image_std: Sequence[float]) -> np.ndarray:
    """The ``(3, H, W)`` normalised model input back as an ``(H, W, 3)`` uint8 picture (what the patches cover)."""
    mean = torch.tensor(image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(image_std, dtype=torch.float32)[:, None, None]
    pixels = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def highlight(view: np.ndarray, kept_indices: torch.Tensor, grid_size: tuple[int, int]) -> np.ndarray:
    """``view`` with every patch outside ``kept_indices`` (row-major over ``grid_size``) darkened."""
    rows, columns = grid_size
    height, width = view.shape[0] // rows, view.shape[1] // columns
    kept = np.zeros(rows * columns, dtype=bool)
    kept[kept_indices.cpu().numpy()] = True
    mask = np.kron(kept.reshape(rows, columns), np.ones((height, width), dtype=bool))
    shown = (view.astype(np.float32) * PRUNED_BRIGHTNESS).astype(np.uint8)
    shown[mask] = view[mask]
    return shown


@dataclass
class MethodView:
    """One method's result on one image, ready to draw."""

    label: str
    trace: PruningTrace
    answer: str | None = None


def _step_panels(trace: PruningTrace, image: int) -> list[tuple[int, torch.Tensor]]:
    """(layer, kept patches) after each prune step, thinned to at most ``MAX_STEP_PANELS`` (the last kept)."""
    record = trace.images[image]
    steps = list(zip(record.prune_layers, record.kept_after_prune, strict=True))
    if len(steps) > MAX_STEP_PANELS:
        picks = np.linspace(0, len(steps) - 1, MAX_STEP_PANELS).round().astype(int)
        steps = [steps[i] for i in sorted(set(picks.tolist()))]
    return steps


def _scored_layers(trace: PruningTrace, image: int, layers: Sequence[int] | None) -> list[int]:
    """The layers whose scores are shown: the requested ones, or up to three evenly spaced scored layers."""
    scores = trace.images[image].scores.get("relation", [])
    scored = [layer for layer, values in enumerate(scores) if values is not None]
    if layers is not None:
        missing = [layer for layer in layers if layer not in scored]
        if missing:
            raise ValueError(f"layers {missing} were not scored for this image; scored layers: {scored}")
        return list(layers)
    if len(scored) <= 3:
        return scored
    return [scored[i] for i in sorted({0, len(scored) // 2, len(scored) - 1})]


def flow_figure(
    view: np.ndarray,
    traces: Sequence[MethodView],
    image: int = 0,
    layers: Sequence[int] | None = None,
    title: str | None = None,
) -> Figure:
    """The figure for one image: prune steps of the first method, its scores and schedule, all methods' kept patches.

    Score heat maps need a trace recorded with ``record_scores=True``; without scores that section is left out.
    """
    from matplotlib.figure import Figure

    if not traces:
        raise ValueError("give at least one method's trace")
    main = traces[0]
    trace = main.trace
    record = trace.images[image]
    steps = _step_panels(trace, image)
    shown_layers = _scored_layers(trace, image, layers) if record.scores else []
    sections = [("steps", 1.0)]
    if shown_layers:
        sections.append(("scores", len(CRITERIA) * 0.85))
    sections.append(("schedule", 0.9))
    if len(traces) > 1:
        sections.append(("methods", 1.0))
    columns = max(1 + len(steps), len(shown_layers), len(traces))
    figure = Figure(figsize=(2.3 * columns, 2.6 * sum(height for _, height in sections)), layout="constrained")
    if title:
        figure.suptitle(title)
    parts = figure.subfigures(len(sections), 1, height_ratios=[height for _, height in sections])
    parts = np.atleast_1d(parts)
    for part, (name, _) in zip(parts, sections, strict=True):
        if name == "steps":
            _draw_steps(part, view, trace, image, steps, main.label, columns)
        elif name == "scores":
            _draw_scores(part, trace, image, shown_layers, columns)
        elif name == "schedule":
            _draw_schedule(part, trace, image)
        else:
            _draw_methods(part, view, traces, image, columns)
    return figure


def _hide(axes: Any) -> None:
    axes.set_xticks([])
    axes.set_yticks([])


def _draw_steps(part: Any, view: np.ndarray, trace: PruningTrace, image: int, steps: list, label: str, columns: int):
    part.suptitle(f"{label}: patches alive after each prune step (pruned patches darkened)", fontsize="medium")
    axes = part.subplots(1, columns, squeeze=False)[0]
    axes[0].imshow(view)
    axes[0].set_title(f"input: {trace.num_patches} patches", fontsize="small")
    for panel, (layer, kept) in zip(axes[1:], steps, strict=False):
        panel.imshow(highlight(view, kept, trace.grid_size))
        panel.set_title(f"after layer {layer}: {len(kept)}", fontsize="small")
    for panel in axes:
        _hide(panel)
    for panel in axes[1 + len(steps) :]:
        panel.set_visible(False)


def _draw_scores(part: Any, trace: PruningTrace, image: int, layers: list[int], columns: int) -> None:
    import matplotlib

    part.suptitle("criteria and cumulative score per patch (grey: already pruned)", fontsize="medium")
    axes = part.subplots(len(CRITERIA), columns, squeeze=False)
    colour_map = matplotlib.colormaps["magma"].with_extremes(bad="0.6")
    scores = trace.images[image].scores
    for row, (name, label) in enumerate(CRITERIA):
        for column in range(columns):
            panel = axes[row, column]
            _hide(panel)
            if column >= len(layers):
                panel.set_visible(False)
                continue
            values = scores[name][layers[column]].view(trace.grid_size).numpy()
            panel.imshow(values, cmap=colour_map, vmin=np.nanmin(values), vmax=np.nanmax(values))
            if row == 0:
                panel.set_title(f"layer {layers[column]}", fontsize="small")
            if column == 0:
                panel.set_ylabel(label, fontsize="small")


def _draw_schedule(part: Any, trace: PruningTrace, image: int) -> None:
    record = trace.images[image]
    axes = part.subplots(1, 1)
    layers = list(range(len(record.tokens_per_layer)))
    axes.step(layers, record.tokens_per_layer, where="post", color="tab:blue", label="patch tokens in the layer")
    axes.set_xlabel("encoder layer")
    axes.set_ylabel("patch tokens", color="tab:blue")
    axes.set_ylim(0, trace.num_patches * 1.05)
    axes.set_xticks(layers)
    ratios = [(layer, ratio) for layer, ratio in enumerate(record.entropy_ratios) if ratio is not None]
    if ratios:
        entropy = axes.twinx()
        entropy.plot(*zip(*ratios, strict=True), "o-", color="tab:red", label="CLS attention entropy H / log N")
        entropy.set_ylabel("H / log N", color="tab:red")
        entropy.set_ylim(0, 1.05)
    for layer in record.prune_layers:
        axes.axvline(layer, color="0.8", linewidth=0.8, zorder=0)
    axes.set_title("live tokens and CLS-attention entropy per layer (grey lines: prune steps)", fontsize="medium")


def _draw_methods(part: Any, view: np.ndarray, traces: Sequence[MethodView], image: int, columns: int) -> None:
    part.suptitle("kept patches per method on the same image", fontsize="medium")
    axes = part.subplots(1, columns, squeeze=False)[0]
    for panel, method in zip(axes, traces, strict=False):
        trace = method.trace
        panel.imshow(highlight(view, trace.images[image].kept_indices, trace.grid_size))
        title = f"{method.label}: {trace.keep} tokens"
        if method.answer is not None:
            title += f"\nanswer: {method.answer}"
        panel.set_title(title, fontsize="small")
    for panel in axes:
        _hide(panel)
    for panel in axes[len(traces) :]:
        panel.set_visible(False)


def visualise(
    model: torch.nn.Module,
    processor: Any,
    image: Any,
    keep: int,
    methods: Sequence[str] = ("flowcut",),
    prompt: str | None = None,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = 8,
) -> Figure:
    """Prune ``image`` with each method (scores recorded), answer ``prompt`` if given, and draw the figure.

    The model is left as it was: each method is applied and removed in turn.
    """
    import flowcut
    from flowcut.methods import get_method
    from flowcut.tools.prompting import prompt_inputs

    if not methods:
        raise ValueError("give at least one method")
    views: list[MethodView] = []
    pixel_values = None
    for method in methods:
        options = {"record_scores": True} if "record_scores" in get_method(method).settings else {}
        with flowcut.apply(model, processor=processor, keep=keep, method=method, **options) as handle:
            inputs = prompt_inputs(processor, image, prompt or "", model.device, model.dtype)
            pixel_values = inputs["pixel_values"][0]
            with torch.inference_mode():  # without a prompt, one token: language-stage methods prune in the prefill
                output = model.generate(**inputs, max_new_tokens=max_new_tokens if prompt else 1, do_sample=False)
            answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            views.append(MethodView(method, handle.last_trace, answer.strip() if prompt else None))
    image_processor = processor.image_processor
    view = model_view(pixel_values, image_processor.image_mean, image_processor.image_std)
    title = f"keep {keep} of {views[0].trace.num_patches}" + (f" · prompt: {prompt}" if prompt else "")
    return flow_figure(view, views, layers=layers, title=title)


def video_strip_figure(frames: Sequence[np.ndarray], views: Sequence[MethodView], title: str | None = None) -> Figure:
    """A video's frames as a strip, one row per method, each frame with the patches its encoder stage kept.

    ``frames`` are the frames as the model saw them (:func:`model_view`); each view's trace holds the
    video's frames in ``trace.videos[0]``. A method that prunes only inside the language model keeps
    every patch in the encoder; its row says how many of the video's tokens the later layers see.
    """
    from matplotlib.figure import Figure

    if not views:
        raise ValueError("give at least one method's trace")
    figure = Figure(figsize=(1.9 * len(frames), 2.2 * len(views) + 0.4), layout="constrained")
    if title:
        figure.suptitle(title)
    axes = np.atleast_2d(figure.subplots(len(views), len(frames), squeeze=False))
    for row, method_view in enumerate(views):
        trace = method_view.trace
        frame_traces = (trace.videos or [None])[0]
        for column, frame in enumerate(frames):
            panel = axes[row, column]
            if frame_traces is None:
                panel.imshow(frame)
                kept = "all"
            else:
                panel.imshow(highlight(frame, frame_traces[column].kept_indices, trace.grid_size))
                kept = str(len(frame_traces[column].kept_indices))
            panel.set_title(f"frame {column + 1}: {kept} kept", fontsize="small")
            _hide(panel)
        label = method_view.label
        if trace.video_tokens:
            stock, entering, later = trace.video_tokens[0]
            label += f"\n{entering} in, {later} after layer 1\nof {stock}"
        if method_view.answer is not None:
            label += f"\n→ {method_view.answer}"
        axes[row, 0].set_ylabel(label, fontsize="small")
    return figure


def visualise_video(
    model: torch.nn.Module,
    processor: Any,
    frames: np.ndarray,
    keep: int | float,
    methods: Sequence[str] = ("flowcut",),
    prompt: str | None = None,
    max_new_tokens: int = 8,
) -> Figure:
    """Prune one video (``(F, H, W, 3)`` frames) with each method, answer ``prompt`` if given, and draw the strip.

    Supports models whose processor returns ``pixel_values_videos`` as frames (Video-LLaVA,
    LLaVA-NeXT-Video, LLaVA-OneVision); the model is left as it was.
    """
    import flowcut
    from flowcut.tools.prompting import video_prompt_inputs

    if not methods:
        raise ValueError("give at least one method")
    views: list[MethodView] = []
    pixels = None
    for method in methods:
        with flowcut.apply(model, processor=processor, keep=keep, method=method) as handle:
            inputs = video_prompt_inputs(processor, frames, prompt or "", model.device, model.dtype)
            pixels = inputs["pixel_values_videos"]
            if pixels.dim() != 5:
                raise ValueError(
                    f"drawing a video needs frames of pixels; {type(model).__name__} packs them as patches"
                )
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens if prompt else 1, do_sample=False)
            answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            views.append(MethodView(method, handle.last_trace, answer.strip() if prompt else None))
    normaliser = getattr(processor, "video_processor", None)
    normaliser = getattr(normaliser, "image_processor", normaliser)  # frame-by-frame stand-ins wrap one
    shown = [model_view(frame, normaliser.image_mean, normaliser.image_std) for frame in pixels[0]]
    title = f"keep {keep} of the video's visual tokens" + (f" · prompt: {prompt}" if prompt else "")
    return video_strip_figure(shown, views, title)
