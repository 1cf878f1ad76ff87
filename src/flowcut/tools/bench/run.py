"""Measure what pruning buys, methods side by side on one model: encoder, prefill and generation times,
decode speed, peak memory, KV-cache size, and the analytic FLOPs next to them.

Settings are measured interleaved (A B C A B C …) after warm-up rounds, so drift in clock speed or
thermal state hits every setting alike; each number is the median over the rounds, with its
minimum and maximum. On CUDA the timer synchronises and uses CUDA events; elsewhere it is the
wall clock. Peak memory is measured in one extra, untimed prefill per setting after the timed
rounds (:mod:`flowcut.tools.bench.memory`). Every report names the device, dtype, threads and library
versions.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
import transformers

from flowcut import compat
from flowcut.api import apply, check_applicable
from flowcut.config import FlowCutConfig
from flowcut.families import family_of
from flowcut.methods import get_method
from flowcut.runtime.media import TwoStageFamily
from flowcut.tools.bench.flops import PrefillFlops, ProjectorShape, TextShape, VisionShape, prefill_flops
from flowcut.tools.bench.memory import peak_bytes
from flowcut.tools.prompting import prompt_inputs, video_prompt_inputs


@dataclass(frozen=True)
class BenchSetting:
    """One column of the benchmark: a method at a budget, or the unpruned model (``method=None``)."""

    method: str | None
    keep: int | None = None
    stages: str = "auto"
    """``"encoder"``: the method's encoder-only mode on two-stage families (:attr:`FlowCutConfig.stages`)."""

    @classmethod
    def parse(cls, spec: str, keep: int | float) -> BenchSetting:
        """A setting from ``"method"`` or ``"method:encoder"`` (its encoder-only mode) at ``keep``; checked."""
        method, colon, stages = spec.partition(":")
        if colon and stages != "encoder":
            raise ValueError(f"{spec!r}: write a method name, or 'name:encoder' for its encoder-only mode")
        config = FlowCutConfig(keep=keep, method=method, stages=stages or "auto")
        if stages and not get_method(config.method).prunes:
            raise ValueError(f"{spec!r}: method {method!r} prunes nowhere, so it has no encoder-only mode")
        return cls(method, config.keep, config.stages)

    @property
    def series(self) -> str:
        """The method as the tables and plot name it: ``"flowcut"``, ``"flowcut:encoder"``."""
        return f"{self.method}:{self.stages}" if self.stages != "auto" else str(self.method)

    @property
    def label(self) -> str:
        """``"flowcut@64"``, ``"flowcut:encoder@64"``, or ``"unpruned"``."""
        return "unpruned" if self.method is None else f"{self.series}@{self.keep}"

    def config(self) -> FlowCutConfig:
        """The pruning configuration of a method setting (FlowCut also times its own scoring)."""
        timed = self.method is not None and "time_scoring" in get_method(self.method).settings
        return FlowCutConfig(keep=self.keep, method=self.method, time_scoring=timed, stages=self.stages)


@dataclass
class Timings:
    """Milliseconds per round."""

    vision: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    generate: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    """``generate`` of a single token: the same work as ``generate`` but its decoding steps."""
    scoring: list[float] = field(default_factory=list)
    """FlowCut only: the time the prefill's encoder pass (the same work as ``vision``) spent scoring and selecting."""


@dataclass
class BenchResult:
    """Everything measured for one setting."""

    setting: BenchSetting
    timings: Timings
    visual_tokens: int
    """Visual tokens of the image (or video) that the language model's later layers see."""
    prompt_tokens: int
    kv_cache_bytes: int
    flops: PrefillFlops | None
    """None for model families the analytic count does not cover."""
    new_tokens: int
    peak_prefill_bytes: int | None = None
    """Peak memory of a prefill above what was allocated before it (weights and inputs excluded); None: not
    measured."""

    def median(self, name: str) -> float:
        """Median milliseconds of ``"vision"``, ``"prefill"``, ``"generate"`` or ``"first_token"``."""
        return statistics.median(getattr(self.timings, name))

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Decoding speed: the tokens after the first, per second of ``generate`` beyond a one-token ``generate``.

        Both calls run the same encoder, prefill and generation set-up, so their difference is the
        decoding steps alone (medians over the rounds). None when generation was not measured.
        """
        if not self.timings.generate:
            return None
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


VIT_TOWERS = ("clip_vision_model", "siglip_vision_model")
"""ViT towers with a fixed grid (CLIP: one CLS token; SigLIP: none) and LLaVA's two-layer projector."""
QWEN_TOWERS = ("qwen2_vl_vision", "qwen3_vl_vision")
"""Qwen2-VL's and Qwen3-VL's towers: no CLS, 3-D patches, 2×2 merger (Qwen3-VL: plus one DeepStack merger per
DeepStack block; its learned position grid is a weighted lookup, no product). Qwen2.5-VL's windowed attention
and Qwen3-VL-MoE's experts are not counted yet."""


def model_shapes(
    model: torch.nn.Module, patches: int | None = None
) -> tuple[VisionShape, ProjectorShape, TextShape] | None:
    """The FLOP-counting shapes of a model, or None for a model the analytic count does not cover.

    ``patches``: patches per encoder pass for dynamic-resolution towers (Qwen2-VL), which have no fixed grid.
    """
    config = model.config
    vision, text = config.vision_config, config.text_config
    text_shape = TextShape(
        text.hidden_size,
        text.intermediate_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.num_key_value_heads or text.num_attention_heads,
        text.vocab_size,
        getattr(text, "head_dim", None),
    )
    if vision.model_type in VIT_TOWERS:
        pooled = config.model_type == "gemma3"  # Gemma 3: SigLIP pooled into its tokens, one matrix per token
        if not pooled and not isinstance(config.vision_feature_layer, int):
            return None  # several feature layers side by side: a wider projector input than counted here
        grid = vision.image_size // vision.patch_size
        class_tokens = 1 if vision.model_type == "clip_vision_model" else 0  # SigLIP towers have no CLS
        shape = VisionShape(
            vision.hidden_size,
            vision.intermediate_size,
            vision.num_hidden_layers,
            vision.patch_size,
            grid**2,
            class_tokens=class_tokens,
        )
        projector = ProjectorShape(vision.hidden_size, None if pooled else text.hidden_size, text.hidden_size)
        return shape, projector, text_shape
    if vision.model_type == "internvl_vision":  # InternViT (CLS) per tile; the projector maps each 2×2 shuffle group
        side = vision.image_size[0] // vision.patch_size[0]
        shape = VisionShape(
            vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.patch_size[0], side**2
        )
        shuffled = vision.hidden_size * round(1 / config.downsample_ratio) ** 2
        return shape, ProjectorShape(shuffled, text.hidden_size, text.hidden_size), text_shape
    if vision.model_type in QWEN_TOWERS:
        if patches is None:
            raise ValueError("Qwen2-VL's FLOPs need the patches per encoder pass (its resolution is dynamic)")
        if vision.model_type == "qwen2_vl_vision":
            width, intermediate = vision.embed_dim, int(vision.embed_dim * vision.mlp_ratio)
        else:
            width, intermediate = vision.hidden_size, vision.intermediate_size
        shape = VisionShape(
            width,
            intermediate,
            vision.depth,
            vision.patch_size,
            patches,
            channels=vision.in_channels,
            class_tokens=0,
            temporal_patch=vision.temporal_patch_size,
        )
        merged = width * vision.spatial_merge_size**2
        mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or [])
        return shape, ProjectorShape(merged, merged, text.hidden_size, mergers), text_shape
    return None


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
    generate: bool = True,
    memory: bool = True,
) -> list[BenchResult]:
    """Measure every setting ``rounds`` times, interleaved, after ``warmup`` unrecorded rounds.

    With ``video`` (``(F, H, W, 3)`` frames, for a video model) the prompt asks about the video
    instead of ``image``, the encoder time is the video's, and budgets count the video's tokens.
    ``generate=False`` times the encoder and the prefill only (large models on a CPU);
    ``memory=False`` skips the peak-memory pass.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError("rounds must be at least 1 and warmup at least 0")
    if generate and new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 (decode speed compares it with a one-token generate)")
    check_applicable(model, [setting.config() for setting in settings if setting.method is not None])
    family = family_of(model)
    if any(setting.stages == "encoder" for setting in settings) and not issubclass(family, TwoStageFamily):
        raise ValueError(
            f"{family.family_name} prunes in the vision encoder alone: 'name:encoder' is the same as 'name' there"
        )
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    timed = _timer(device)
    results: dict[BenchSetting, BenchResult] = {}
    generation = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    one_token = {**generation, "max_new_tokens": 1, "min_new_tokens": 1}
    for round_index in range(warmup + rounds):
        for setting in settings:
            with _applied(model, processor, setting) as handle:
                inputs, encode = _prompt(model, processor, image, video, prompt, device, dtype)
                with torch.inference_mode():
                    vision_ms, _ = timed(encode)
                    prefill_ms, output = timed(_prefill(model, inputs))
                    # The prefill's encoder pass is the encoder call's work again; every family traces a prefill.
                    scoring_ms = handle.last_trace.scoring_ms if handle and handle.config.time_scoring else None
                    if generate:
                        generate_ms, _ = timed(partial(model.generate, **inputs, **generation))
                        first_token_ms, _ = timed(partial(model.generate, **inputs, **one_token))
                if round_index < warmup:
                    continue
                if setting not in results:
                    results[setting] = _result(model, setting, handle, inputs, output, new_tokens)
                timings = results[setting].timings
                timings.vision.append(vision_ms)
                timings.prefill.append(prefill_ms)
                if generate:
                    timings.generate.append(generate_ms)
                    timings.first_token.append(first_token_ms)
                if scoring_ms is not None:
                    timings.scoring.append(scoring_ms)
        if on_round is not None and round_index >= warmup:
            on_round(round_index - warmup + 1)
    if memory:
        for setting in settings:
            with _applied(model, processor, setting), torch.inference_mode():
                inputs, _ = _prompt(model, processor, image, video, prompt, device, dtype)
                results[setting].peak_prefill_bytes, _ = peak_bytes(_prefill(model, inputs), device)
    return [results[setting] for setting in settings]


@contextmanager
def _applied(model: torch.nn.Module, processor: Any, setting: BenchSetting) -> Iterator[Any]:
    """The setting's pruning on ``model`` for the duration (its handle), or nothing for the unpruned model."""
    handle = None if setting.method is None else apply(model, processor=processor, config=setting.config())
    try:
        yield handle
    finally:
        if handle is not None:
            handle.remove()


def _prefill(model: torch.nn.Module, inputs: Any) -> Callable[[], Any]:
    """The prefill the benchmark times and measures: logits of the last position only, as generate()'s."""
    return partial(model, **inputs, use_cache=True, logits_to_keep=1)


def _prompt(
    model: torch.nn.Module, processor: Any, image: Any, video: Any, prompt: str, device: Any, dtype: Any
) -> tuple[Any, Callable[[], Any]]:
    """The prompt's inputs, and a call that runs the model's encoder alone on its image or video."""
    if video is None:
        inputs = prompt_inputs(processor, image, prompt, device, dtype)
        extra = {key: inputs[key] for key in ("image_sizes", "image_grid_thw") if key in inputs}
        return inputs, partial(model.model.get_image_features, inputs["pixel_values"], **extra)
    inputs = video_prompt_inputs(processor, video, prompt, device, dtype)
    extra = {key: inputs[key] for key in ("video_grid_thw",) if key in inputs}
    return inputs, partial(model.model.get_video_features, inputs["pixel_values_videos"], **extra)


def _result(
    model: torch.nn.Module,
    setting: BenchSetting,
    handle: Any,
    inputs: Any,
    output: Any,
    new_tokens: int,
) -> BenchResult:
    video = inputs.get("pixel_values_videos") is not None
    token = model.config.video_token_id if video else model.config.image_token_id
    length = inputs["input_ids"].shape[1]
    entering = int((inputs["input_ids"][0] == token).sum())
    prompt_tokens = length - entering
    trace = handle.last_trace if handle is not None else None
    kept = None
    if trace is not None and trace.language_positions is not None:  # pruned inside the language model
        kept = trace.language_positions.shape[1]
    visual = entering if kept is None else kept - prompt_tokens
    flops = None
    family = family_of(model)
    passes, projected = (family.encoder_work(model, trace, inputs) if family else None) or ([], None)
    shapes = model_shapes(model, patches=passes[0][0]) if passes else None
    if shapes is not None:
        vision_shape, projector, text_shape = shapes
        language = None
        if kept is not None:
            layer = get_method(setting.method).language_layer
            language = [length] * (layer + 1) + [kept] * (text_shape.layers - layer - 1)
        flops = prefill_flops(
            vision_shape,
            text_shape,
            passes,
            entering,
            prompt_tokens,
            language,
            projector=projector,
            projector_tokens=entering if projected is None else projected,
        )
    return BenchResult(
        setting, Timings(), visual, prompt_tokens, _cache_bytes(compat.output_cache(output)), flops, new_tokens
    )


def to_markdown(results: Sequence[BenchResult], env: dict[str, Any]) -> str:
    """The results as a Markdown table, speed-ups relative to the first (unpruned) setting; "–" where not measured."""
    reference = results[0]
    generated = f"{reference.new_tokens} new tokens generated" if reference.timings.generate else "no generation"
    lines = [
        "Device: " + ", ".join(f"{key} {value}" for key, value in env.items()) + ".",
        f"Medians over {len(reference.timings.prefill)} interleaved rounds (min–max in brackets); "
        f"{reference.prompt_tokens} text tokens in the prompt; {generated}.",
        *(f"Warning: {note}." for note in warnings_for(results)),  # before the table: read first
        "",
        "| setting | visual tokens | encoder ms | prefill ms | generate ms | decode tok/s | prefill peak MiB "
        "| KV cache MiB | prefill GFLOPs | prefill speed-up | FLOP-bound speed-up | scoring ms (share of encoder) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        cells = [result.setting.label, str(result.visual_tokens)]
        for name in ("vision", "prefill", "generate"):
            values = getattr(result.timings, name)
            cells.append(f"{result.median(name):.1f} ({min(values):.1f}–{max(values):.1f})" if values else "–")
        decode = result.decode_tokens_per_second
        cells.append("–" if decode is None else f"{decode:.1f}")
        peak = result.peak_prefill_bytes
        cells.append("–" if peak is None else f"{peak / 2**20:.1f}")
        cells.append(f"{result.kv_cache_bytes / 2**20:.2f}")
        cells.append("–" if result.flops is None else f"{result.flops.total / 1e9:.2f}")
        cells.append(f"{reference.median('prefill') / result.median('prefill'):.2f}×")
        if result.flops is None or reference.flops is None:
            cells.append("–")
        else:
            cells.append(f"{reference.flops.total / result.flops.total:.2f}×")
        if result.timings.scoring:
            scoring = statistics.median(result.timings.scoring)
            cells.append(f"{scoring:.2f} ({100 * scoring / result.median('vision'):.1f} %)")
        else:
            cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


FEW_ROUNDS = 3
"""Fewer measured rounds than this make medians of single noisy samples."""
ABOVE_BOUND = 1.5
"""A measured prefill speed-up this many times its FLOP bound is taken as noise, not as a result."""


def warnings_for(results: Sequence[BenchResult]) -> list[str]:
    """Numbers that cannot be right or are too noisy to read: few rounds, a prefill faster than its own
    encoder, a measured speed-up far above what the FLOPs allow."""
    reference = results[0]
    notes = []
    rounds = len(reference.timings.prefill)
    if rounds < FEW_ROUNDS:
        notes.append(f"only {rounds} measured round(s): timings are single samples; use --rounds {FEW_ROUNDS} or more")
    for result in results:
        label = result.setting.label
        if result.median("prefill") < result.median("vision"):
            notes.append(
                f"{label}: the prefill ({result.median('prefill'):.1f} ms) includes the encoder yet measured below it "
                f"({result.median('vision'):.1f} ms): noisy timings; raise --rounds and --warmup"
            )
        if result.flops is not None and reference.flops is not None and result is not reference:
            measured = reference.median("prefill") / result.median("prefill")
            bound = reference.flops.total / result.flops.total
            if measured > ABOVE_BOUND * bound:
                notes.append(
                    f"{label}: measured prefill speed-up {measured:.2f}× is far above its FLOP bound {bound:.2f}×: "
                    "noise or warm-up effects; raise --rounds and --warmup"
                )
    return notes


def to_dict(results: Sequence[BenchResult], env: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready results."""
    rows = []
    for result in results:
        row = asdict(result)
        row["label"] = result.setting.label
        if result.flops is not None:
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
    methods = dict.fromkeys(result.setting.series for result in results if result.setting.method is not None)
    for method in methods:
        rows = sorted(
            (r for r in results if r.setting.method is not None and r.setting.series == method),
            key=lambda r: r.visual_tokens,
        )
        budgets = [r.visual_tokens for r in rows]
        measured.plot(budgets, [reference.median("prefill") / r.median("prefill") for r in rows], "o-", label=method)
        if reference.flops is not None and all(r.flops is not None for r in rows):
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
