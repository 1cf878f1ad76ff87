"""Measure what pruning buys, methods side by side on one model: encoder, prefill and generation times,
decode speed, KV-cache size, and the analytic FLOPs next to them.

Settings are measured interleaved (A B C A B C …) after warm-up rounds, so drift in clock speed or
thermal state hits every setting alike; each number is the median over the rounds, with its
minimum and maximum. On CUDA the timer synchronises and uses CUDA events; elsewhere it is the
wall clock. Every report names the device, dtype, threads and library versions.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
import transformers

from flowcut.api import apply, check_applicable
from flowcut.bench.flops import PrefillFlops, TextShape, VisionShape, prefill_flops
from flowcut.config import FlowCutConfig
from flowcut.methods import get_method
from flowcut.prompting import prompt_inputs, video_prompt_inputs


@dataclass(frozen=True)
class BenchSetting:
    """One column of the benchmark: a method at a budget, or the unpruned model (``method=None``)."""

    method: str | None
    keep: int | None = None

    @property
    def label(self) -> str:
        """``"flowcut@64"``, or ``"unpruned"``."""
        return "unpruned" if self.method is None else f"{self.method}@{self.keep}"

    def config(self) -> FlowCutConfig:
        """The pruning configuration of a method setting (FlowCut also times its own scoring)."""
        return FlowCutConfig(keep=self.keep, method=self.method, time_scoring=self.method == "flowcut")


@dataclass
class Timings:
    """Milliseconds per round."""

    vision: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    generate: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    """``generate`` of a single token: the same work as ``generate`` but its decoding steps."""
    scoring: list[float] = field(default_factory=list)
    """FlowCut only: the part of each encoder time spent scoring and selecting tokens."""


@dataclass
class BenchResult:
    """Everything measured for one setting."""

    setting: BenchSetting
    timings: Timings
    visual_tokens: int
    """Visual tokens per image the language model's later layers see."""
    prompt_tokens: int
    kv_cache_bytes: int
    flops: PrefillFlops
    new_tokens: int

    def median(self, name: str) -> float:
        """Median milliseconds of ``"vision"``, ``"prefill"``, ``"generate"`` or ``"first_token"``."""
        return statistics.median(getattr(self.timings, name))

    @property
    def decode_tokens_per_second(self) -> float:
        """Decoding speed: the tokens after the first, per second of ``generate`` beyond a one-token ``generate``.

        Both calls run the same encoder, prefill and generation set-up, so their difference is the
        decoding steps alone (medians over the rounds).
        """
        decode_ms = self.median("generate") - self.median("first_token")
        return (self.new_tokens - 1) / (decode_ms / 1000) if decode_ms > 0 else float("inf")


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], tuple[float, Any]]:
    """A function that runs a callable and returns (milliseconds, result)."""
    if device.type == "cuda":

        def timed(work: Callable[[], Any]) -> tuple[float, Any]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            result = work()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end), result

        return timed

    def timed(work: Callable[[], Any]) -> tuple[float, Any]:
        start = time.perf_counter()
        result = work()
        return 1000 * (time.perf_counter() - start), result

    return timed


def _cache_bytes(cache: Any) -> int:
    """Bytes of every key and value tensor a cache holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def model_shapes(model: torch.nn.Module) -> tuple[VisionShape, TextShape]:
    """The FLOP-counting shapes of a LLaVA-1.5-style model."""
    vision, text = model.config.vision_config, model.config.text_config
    grid = vision.image_size // vision.patch_size
    return (
        VisionShape(vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.patch_size, grid**2),
        TextShape(
            text.hidden_size,
            text.intermediate_size,
            text.num_hidden_layers,
            text.num_attention_heads,
            text.num_key_value_heads or text.num_attention_heads,
            text.vocab_size,
        ),
    )


def environment(model: torch.nn.Module) -> dict[str, Any]:
    """Device, dtype, threads and versions, reported with every result."""
    device = next(model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": f"{device} ({name})",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def benchmark(
    model: torch.nn.Module,
    processor: Any,
    image: Any,
    prompt: str,
    settings: Sequence[BenchSetting],
    rounds: int = 5,
    warmup: int = 1,
    new_tokens: int = 8,
    on_round: Callable[[int], None] | None = None,
    video: Any = None,
) -> list[BenchResult]:
    """Measure every setting ``rounds`` times, interleaved, after ``warmup`` unrecorded rounds.

    With ``video`` (``(F, H, W, 3)`` frames, for a video model) the prompt asks about the video
    instead of ``image``, the encoder time is the video's, and budgets count the video's tokens.
    """
    if rounds < 1 or warmup < 0 or new_tokens < 2:
        raise ValueError("rounds must be at least 1, warmup at least 0 and new_tokens at least 2")
    check_applicable(model, [setting.config() for setting in settings if setting.method is not None])
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    timed = _timer(device)
    vision_shape, text_shape = model_shapes(model)
    results: dict[BenchSetting, BenchResult] = {}
    for round_index in range(warmup + rounds):
        for setting in settings:
            handle = None
            if setting.method is not None:
                handle = apply(model, processor=processor, config=setting.config())
            try:
                if video is None:
                    inputs = prompt_inputs(processor, image, prompt, device, dtype)
                    encode = partial(model.model.get_image_features, inputs["pixel_values"])
                else:
                    inputs = video_prompt_inputs(processor, video, prompt, device, dtype)
                    encode = partial(model.model.get_video_features, inputs["pixel_values_videos"])
                generation = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
                with torch.inference_mode():
                    vision_ms, _ = timed(encode)
                    scoring_ms = handle.last_trace.scoring_ms if setting.method == "flowcut" else None
                    # Logits of the last position only, as generate() computes them in its prefill.
                    prefill_ms, output = timed(partial(model, **inputs, use_cache=True, logits_to_keep=1))
                    generate_ms, _ = timed(partial(model.generate, **inputs, **generation))
                    one_token = {**generation, "max_new_tokens": 1, "min_new_tokens": 1}
                    first_token_ms, _ = timed(partial(model.generate, **inputs, **one_token))
                if round_index < warmup:
                    continue
                if setting not in results:
                    results[setting] = _result(
                        model, setting, handle, inputs, output, vision_shape, text_shape, new_tokens
                    )
                timings = results[setting].timings
                timings.vision.append(vision_ms)
                timings.prefill.append(prefill_ms)
                timings.generate.append(generate_ms)
                timings.first_token.append(first_token_ms)
                if scoring_ms is not None:
                    timings.scoring.append(scoring_ms)
            finally:
                if handle is not None:
                    handle.remove()
        if on_round is not None and round_index >= warmup:
            on_round(round_index - warmup + 1)
    return [results[setting] for setting in settings]


def _result(
    model: torch.nn.Module,
    setting: BenchSetting,
    handle: Any,
    inputs: Any,
    output: Any,
    vision_shape: VisionShape,
    text_shape: TextShape,
    new_tokens: int,
) -> BenchResult:
    video = inputs.get("pixel_values_videos")
    token = model.config.image_token_id if video is None else model.config.video_token_id
    length = inputs["input_ids"].shape[1]
    entering = int((inputs["input_ids"][0] == token).sum())
    prompt_tokens = length - entering
    trace = handle.last_trace if handle is not None else None
    if trace is None:
        # The stock path runs every layer, on the image or on each of the video's frames.
        tokens_per_layer = [[vision_shape.num_patches] * vision_shape.layers] * (1 if video is None else video.shape[1])
        language = None
        visual = entering
    else:
        if video is None:
            tokens_per_layer, visual = [trace.images[0].tokens_per_layer], trace.keep
        else:
            tokens_per_layer, visual = [frame.tokens_per_layer for frame in trace.videos[0]], trace.video_keep
        language = None
        if trace.language_positions is not None:  # pruned inside the language model after one layer
            layer = get_method(setting.method).language_layer
            kept = trace.language_positions.shape[1]
            language = [length] * (layer + 1) + [kept] * (text_shape.layers - layer - 1)
    flops = prefill_flops(vision_shape, text_shape, tokens_per_layer, entering, prompt_tokens, language)
    return BenchResult(
        setting, Timings(), visual, prompt_tokens, _cache_bytes(output.past_key_values), flops, new_tokens
    )


def to_markdown(results: Sequence[BenchResult], env: dict[str, Any]) -> str:
    """The results as a Markdown table, speed-ups relative to the first (unpruned) setting."""
    reference = results[0]
    lines = [
        "Device: " + ", ".join(f"{key} {value}" for key, value in env.items()) + ".",
        f"Medians over {len(reference.timings.prefill)} interleaved rounds (min–max in brackets); "
        f"{reference.prompt_tokens} text tokens in the prompt; {reference.new_tokens} new tokens generated.",
        "",
        "| setting | visual tokens | encoder ms | prefill ms | generate ms | decode tok/s | KV cache MiB "
        "| prefill GFLOPs | prefill speed-up | FLOP-bound speed-up | scoring ms (share of encoder) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        cells = [result.setting.label, str(result.visual_tokens)]
        for name in ("vision", "prefill", "generate"):
            values = getattr(result.timings, name)
            cells.append(f"{result.median(name):.1f} ({min(values):.1f}–{max(values):.1f})")
        cells.append(f"{result.decode_tokens_per_second:.1f}")
        cells.append(f"{result.kv_cache_bytes / 2**20:.2f}")
        cells.append(f"{result.flops.total / 1e9:.2f}")
        cells.append(f"{reference.median('prefill') / result.median('prefill'):.2f}×")
        cells.append(f"{reference.flops.total / result.flops.total:.2f}×")
        if result.timings.scoring:
            scoring = statistics.median(result.timings.scoring)
            cells.append(f"{scoring:.2f} ({100 * scoring / result.median('vision'):.1f} %)")
        else:
            cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_dict(results: Sequence[BenchResult], env: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready results."""
    rows = []
    for result in results:
        row = asdict(result)
        row["label"] = result.setting.label
        row["flops"]["total"] = result.flops.total
        row["decode_tokens_per_second"] = result.decode_tokens_per_second
        rows.append(row)
    return {"environment": env, "results": rows}


def plot(results: Sequence[BenchResult], path: Any) -> Any:
    """Measured prefill speed-up and FLOP-bound speed-up vs visual tokens kept, one line per method."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'flowcut-vlm[plot]'") from error
    reference = results[0]
    figure = Figure(figsize=(10, 4), dpi=120)
    measured, bound = figure.subplots(1, 2, sharey=True)
    methods = dict.fromkeys(result.setting.method for result in results if result.setting.method is not None)
    for method in methods:
        rows = sorted((r for r in results if r.setting.method == method), key=lambda r: r.visual_tokens)
        budgets = [r.visual_tokens for r in rows]
        measured.plot(budgets, [reference.median("prefill") / r.median("prefill") for r in rows], "o-", label=method)
        bound.plot(budgets, [reference.flops.total / r.flops.total for r in rows], "o-", label=method)
    budgets = sorted({r.visual_tokens for r in results if r.setting.method is not None})
    for axes, title in ((measured, "measured prefill speed-up"), (bound, "FLOP-bound prefill speed-up")):
        axes.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        axes.set_xscale("log", base=2)
        axes.set_xticks(budgets, [str(budget) for budget in budgets])
        axes.set_xlabel(f"visual tokens kept (of {reference.visual_tokens})")
        axes.set_title(title)
        axes.grid(alpha=0.3)
    measured.set_ylabel("× the unpruned model")
    bound.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return path
