"""The ``flowcut`` command line: answer questions with a pruned model (``generate``), measure accuracy (``eval``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from flowcut.config import COUNTS, CRITERIA, METHODS, SCHEDULES, STAGE_MODES, FlowCutConfig
from flowcut.tools.evaluate import DEFAULT_METHODS
from flowcut.tools.evaluate import METHODS as EVALUATED_METHODS
from flowcut.tools.prompting import prompt_inputs

app = typer.Typer(help="FlowCut visual-token pruning for vision-language models.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)
report = Console(soft_wrap=True, highlight=False)

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _version_callback(value: bool) -> None:
    if value:
        from flowcut import __version__

        typer.echo(f"flowcut-vlm {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """FlowCut visual-token pruning for vision-language models."""


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(message)}")  # literal: "[viz]" is not markup
    raise typer.Exit(code=2)


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_model(model_name: str, device: str, dtype_name: str) -> tuple[Any, Any]:
    """Load a model and its processor from a local directory or the Hugging Face Hub, with clear errors."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    local = Path(model_name).expanduser()
    if local.exists() and not (local / "config.json").exists():
        _fail(f"{local} exists but holds no config.json: not a saved model directory")
    source = str(local) if local.exists() else model_name
    dtype = getattr(torch, dtype_name)

    def load(local_files_only: bool) -> tuple[Any, Any]:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, local_files_only=local_files_only)
        return model, processor

    try:
        model, processor = load(local_files_only=True)
    except OSError as error:
        if local.exists():
            _fail(f"could not load the model in {local}: {error}")
        if not _hub_reachable():
            _fail(
                f"{model_name!r} is neither a local directory nor in the Hugging Face cache, and the Hub "
                "(huggingface.co) cannot be reached from this machine: download it elsewhere or pass a local path"
            )
        try:
            model, processor = load(local_files_only=False)
        except OSError as download_error:
            _fail(f"could not load {model_name!r} from the Hugging Face Hub: {download_error}")
    return model.to(device).eval(), processor


EVAL_METHODS_HELP = f"Comma-separated, from: {', '.join(EVALUATED_METHODS)}."
MODEL_HELP = "Local model directory or Hugging Face Hub id (default: the bundled shapes-VQA reference model)."
ModelOption = Annotated[str | None, typer.Option(help=MODEL_HELP)]
DeviceOption = Annotated[
    str, typer.Option(help="'auto' (cuda where available, else cpu), 'cpu', 'cuda', 'cuda:N', 'mps'.")
]
DtypeOption = Annotated[str, typer.Option(help="'auto' (float16 on GPU, float32 on CPU), float32, float16, bfloat16.")]


def _model_source(model: str | None) -> str:
    if model is not None:
        return model
    from flowcut.reference import bundled_model_path

    path = bundled_model_path()
    if not (path / "config.json").exists():
        _fail(f"the bundled model is missing from {path}; reinstall flowcut-vlm or pass --model")
    return str(path)


def _check_device(device: str) -> None:
    """Refuse a device name torch does not know, or a device this machine does not have."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        _fail(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            _fail(f"--device {device}: torch sees no CUDA GPU here (a CPU-only build or no GPU); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            _fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            _fail(f"--device {device}: Apple's MPS backend is not available here; use --device cpu")
    elif parsed.type != "cpu":
        _fail(f"--device {device}: flowcut runs on cpu, cuda or mps")


def _at_least(value: int, least: int, option: str) -> None:
    if value < least:
        _fail(f"{option} must be at least {least}, got {value}")


def _resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_device(device)
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        _fail(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return device, dtype


def _open_image(path: Path) -> Any:
    """The image at ``path`` as RGB, or a clear error."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        _fail(f"image file not found: {path}")
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        _fail(f"cannot read image {path}: {error}")
        raise  # unreachable: _fail exits


VIDEO_HELP = "Video: a directory of frame images, a .npy (frames, height, width, 3) array, or a video file (needs av)."


def _read_video(path: Path, frames: int) -> Any:
    """``frames`` frames sampled evenly from the video at ``path``, or a clear error."""
    from flowcut.tools.video import read_frames

    try:
        return read_frames(path, frames)
    except ValueError as error:
        _fail(str(error))
        raise  # unreachable: _fail exits


def _unknown_words(processor: Any, text: str) -> list[str]:
    """Words of ``text`` the model's tokenizer can only map to its unknown token."""
    tokenizer = getattr(processor, "tokenizer", None)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        return []
    pairs = zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    words = {text[start:end] for token, (start, end) in pairs if token == unk}
    return sorted(words)


@app.command()
def generate(
    image: Annotated[Path, typer.Option(help="Image file to ask about.")],
    prompt: Annotated[str, typer.Option(help="Question about the image.")],
    model: ModelOption = None,
    keep: Annotated[
        str, typer.Option(help="Visual tokens per image that reach the language model, or a ratio in (0, 1).")
    ] = "64",
    method: Annotated[str, typer.Option(help=f"Pruning method: {', '.join(METHODS)}.")] = "flowcut",
    schedule: Annotated[str, typer.Option(help=f"FlowCut ablation: {', '.join(SCHEDULES)}.")] = "progressive",
    counts: Annotated[str, typer.Option(help=f"FlowCut ablation: {', '.join(COUNTS)}.")] = "adaptive",
    criteria: Annotated[str, typer.Option(help=f"FlowCut ablation: {', '.join(CRITERIA)}.")] = "all",
    ema_weight: Annotated[float, typer.Option(help="FlowCut: weight of the previous cumulative score.")] = 0.5,
    prune_interval: Annotated[int, typer.Option(help="FlowCut: prune every this many layers.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of --method random.")] = 0,
    stages: Annotated[
        str,
        typer.Option(
            help=f"{', '.join(STAGE_MODES)}: 'encoder' prunes two-stage models (LLaVA-NeXT, OneVision, Qwen-VL) "
            "in the vision encoder alone, no decoder layer prunes."
        ),
    ] = "auto",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 32,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Answer PROMPT about IMAGE with METHOD (FlowCut by default) keeping KEEP visual tokens per image."""
    import torch

    import flowcut

    _at_least(max_new_tokens, 1, "--max-new-tokens")
    picture = _open_image(image)
    device, dtype = _resolve_device_dtype(device, dtype)
    try:
        config = FlowCutConfig(
            keep=_parse_keep(keep),
            method=method,
            schedule=schedule,
            counts=counts,
            criteria=criteria,
            ema_weight=ema_weight,
            prune_interval=prune_interval,
            seed=seed,
            stages=stages,
        )
    except (TypeError, ValueError) as error:
        _fail(str(error))

    loaded_model, processor = load_model(_model_source(model), device, dtype)
    unknown = _unknown_words(processor, prompt)
    if unknown:
        console.print(f"[yellow]warning:[/yellow] words this model's tokenizer does not know: {', '.join(unknown)}")
    try:
        handle = flowcut.apply(loaded_model, processor=processor, config=config)
        inputs = prompt_inputs(processor, picture, prompt, device, getattr(torch, dtype))
    except (TypeError, ValueError) as error:
        _fail(str(error))

    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    first_pass_end: list[float] = []

    def mark_prefill(*_: Any) -> None:
        if not first_pass_end:
            synchronize()
            first_pass_end.append(time.perf_counter())

    hook = loaded_model.register_forward_hook(mark_prefill)
    synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        output = loaded_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    synchronize()
    total = time.perf_counter() - start
    hook.remove()

    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    answer = processor.decode(new_tokens, skip_special_tokens=True).strip()
    trace = handle.last_trace
    report.print(answer, markup=False)
    if trace.image_tokens:  # two-stage families: the budget applies after the pruning decoder layer
        stock, entering, kept = trace.image_tokens[0]
        where = (
            "all chosen in the vision encoder"
            if entering == kept
            else f"{entering} enter the language model, {kept} continue after decoder layer 1"
        )
        report.print(f"visual tokens: {kept} of {stock} ({100 * (1 - kept / stock):.1f}% pruned); {where}")
    else:
        report.print(
            f"tokens kept: {handle.tokens_per_image} of {trace.num_patches} per image "
            f"({100 * (1 - handle.tokens_per_image / trace.num_patches):.1f}% pruned)"
        )
    report.print(
        "prefill (vision encoder + prompt; a cold first call, see flowcut bench for warm timings): "
        f"{1000 * (first_pass_end[0] - start):.1f} ms, "
        f"total: {1000 * total:.1f} ms for {new_tokens.numel()} new tokens on {device} ({dtype})"
    )


def _parse_keep(text: str) -> int | float:
    """``--keep``: a whole number of tokens (``64``) or a ratio (``0.111``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        _fail(f"--keep must be a number of tokens or a ratio in (0, 1), got {text!r}")


def _name_list(text: str) -> list[str]:
    """The names of a comma-separated option."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _require_matplotlib(message: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _fail(message)


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        _fail(f"--{name} takes comma-separated integers, got {text!r}")
        raise  # unreachable: _fail exits


def _progress() -> Any:
    """A progress bar on stderr (counts and time left), as ``eval`` and ``bench`` show."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console)


@app.command("eval")
def evaluate_command(
    model: ModelOption = None,
    methods: Annotated[str, typer.Option(help=EVAL_METHODS_HELP)] = ",".join(DEFAULT_METHODS),
    budgets: Annotated[str, typer.Option(help="Comma-separated visual-token budgets per image.")] = "192,128,64,32",
    split: Annotated[str, typer.Option(help="Shapes VQA split: test, validation or train.")] = "test",
    count: Annotated[int, typer.Option(help="Number of questions.")] = 2000,
    start: Annotated[int, typer.Option(help="Index of the first question.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Questions per forward pass.")] = 32,
    output: Annotated[Path, typer.Option(help="Directory for eval.json, eval.md and eval.png.")] = Path("eval-results"),
    plot: Annotated[bool, typer.Option(help="Write the accuracy-vs-tokens plot (needs matplotlib).")] = True,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Accuracy of every method at every budget on the shapes VQA questions, against the unpruned model."""
    from flowcut.data.shapes import GRID, SPLIT_SEEDS, samples
    from flowcut.tools.evaluate import EvalReport, check_settings, evaluate, information_flow, settings_for

    if split not in SPLIT_SEEDS:
        _fail(f"unknown split {split!r}; choose from {', '.join(SPLIT_SEEDS)}")
    if count < 1 or start < 0 or batch_size < 1:
        _fail("--count and --batch-size must be at least 1 and --start at least 0")
    if plot:
        _require_matplotlib("the plot needs matplotlib: pip install 'flowcut-vlm[plot]', or pass --no-plot")
    try:
        settings = settings_for(_name_list(methods), _int_list(budgets, "budgets"))
    except (TypeError, ValueError) as error:
        _fail(str(error))
    device, dtype = _resolve_device_dtype(device, dtype)
    source = _model_source(model)
    loaded_model, processor = load_model(source, device, dtype)
    try:
        check_settings(loaded_model, settings)
    except (TypeError, ValueError) as error:
        _fail(str(error))
    questions = list(samples(split, count, start))
    with _progress() as progress:
        task = progress.add_task(f"{len(settings)} settings × {count} questions", total=len(settings) * count)
        try:
            results = evaluate(
                loaded_model,
                processor,
                questions,
                settings,
                batch_size=batch_size,
                on_batch=lambda done: progress.advance(task, done),
            )
        except (TypeError, ValueError) as error:
            _fail(str(error))
    vision = loaded_model.config.vision_config
    grid = vision.image_size // vision.patch_size
    flow = information_flow(loaded_model, processor, questions[:64]) if grid == GRID else None
    name = model or f"bundled:{Path(source).name}"
    report_data = EvalReport(name, split, start, count, grid * grid, results, flow)
    written = report_data.save(output, plot=plot)
    report.print(report_data.to_markdown(), markup=False)
    report.print("wrote " + ", ".join(str(path) for path in written))


@app.command()
def viz(
    image: Annotated[Path | None, typer.Option(help="Image file to prune.")] = None,
    video: Annotated[Path | None, typer.Option(help=VIDEO_HELP + " Drawn as a strip of frames.")] = None,
    frames: Annotated[int, typer.Option(help="Frames sampled evenly from --video.")] = 8,
    prompt: Annotated[str | None, typer.Option(help="Question to answer under every method (optional).")] = None,
    model: ModelOption = None,
    keep: Annotated[
        str, typer.Option(help="Visual tokens per image (per video with --video) that reach the language model.")
    ] = "64",
    method: Annotated[
        str, typer.Option(help=f"Comma-separated methods; the first is drawn step by step. From: {', '.join(METHODS)}.")
    ] = "flowcut",
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated encoder layers for the score heat maps (default: three).")
    ] = None,
    output: Annotated[Path, typer.Option(help="Figure file, .png or .svg.")] = Path("flowcut-viz.png"),
    dpi: Annotated[int, typer.Option(help="Resolution of a PNG.")] = 110,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Draw what METHOD keeps of IMAGE (prune steps, score heat maps, entropy schedule) or of VIDEO (a frame strip)."""
    if output.suffix.lower() not in (".png", ".svg"):
        _fail(f"--output must end in .png or .svg, got {output.name!r}")
    if (image is None) == (video is None):
        _fail("pass either --image or --video")
    _at_least(frames, 1, "--frames")
    _at_least(dpi, 1, "--dpi")
    _require_matplotlib("flowcut viz needs matplotlib: pip install 'flowcut-vlm[viz]'")
    from flowcut.tools.viz import visualise, visualise_video

    names = _name_list(method)
    budget = _parse_keep(keep)
    try:
        for name in names:
            FlowCutConfig(keep=budget, method=name)
    except (TypeError, ValueError) as error:
        _fail(str(error))
    if not names:
        _fail("--method names no method")
    chosen_layers = _int_list(layers, "layers") if layers else None
    media = _open_image(image) if image is not None else _read_video(video, frames)
    device, dtype = _resolve_device_dtype(device, dtype)
    loaded_model, processor = load_model(_model_source(model), device, dtype)
    try:
        if video is not None:
            if layers:
                _fail("--layers draws score heat maps of an image; a video is drawn as a strip of frames")
            figure = visualise_video(loaded_model, processor, media, budget, names, prompt=prompt)
        else:
            figure = visualise(loaded_model, processor, media, budget, names, prompt=prompt, layers=chosen_layers)
    except (TypeError, ValueError) as error:
        _fail(str(error))
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=dpi)
    report.print(f"wrote {output}")


@app.command()
def bench(
    model: ModelOption = None,
    image: Annotated[Path | None, typer.Option(help="Image (default: shapes-VQA test image 1).")] = None,
    video: Annotated[
        Path | None, typer.Option(help=VIDEO_HELP + " Benchmarks a video model on it (budgets per video).")
    ] = None,
    frames: Annotated[
        int | None, typer.Option(help="Frames sampled from --video (default: the preset's, else 8).")
    ] = None,
    prompt: Annotated[str, typer.Option(help="Question asked in every round.")] = "what colour is the square ?",
    methods: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated, from: {', '.join(METHODS)}; 'name:encoder' runs a method's encoder-only mode "
            "on two-stage families (flowcut:encoder next to flowcut compares the two)."
        ),
    ] = "flowcut,visionzip,fastv,divprune,random",
    budgets: Annotated[str, typer.Option(help="Comma-separated visual-token budgets per image.")] = "64",
    rounds: Annotated[int, typer.Option(help="Measured rounds (each setting once per round, interleaved).")] = 5,
    warmup: Annotated[int, typer.Option(help="Unrecorded rounds first.")] = 1,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per round.")] = 8,
    generate: Annotated[
        bool, typer.Option(help="Time generation too; --no-generate times the encoder and prefill only.")
    ] = True,
    memory: Annotated[bool, typer.Option(help="Measure each setting's peak prefill memory (one extra pass).")] = True,
    output: Annotated[Path, typer.Option(help="Directory for bench.md, bench.json and bench.png.")] = Path(
        "bench-results"
    ),
    plot: Annotated[bool, typer.Option(help="Write the speed-up plot (needs matplotlib).")] = True,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Random weights at a published model's shapes instead of --model: llava-1.5-7b, llava-next-7b, "
            "qwen2-vl-7b, qwen3-vl-8b, gemma-3-4b, internvl3-8b, video-llava-7b (a video of shapes-VQA pictures "
            "unless --video is given)."
        ),
    ] = None,
    text_layers: Annotated[
        int | None, typer.Option(help="With --preset: language-model layers to build (CPU runs: a few).")
    ] = None,
    smoke: Annotated[bool, typer.Option(help="With --preset: every width divided by 16 (a quick check).")] = False,
    attention: Annotated[
        str | None,
        typer.Option(help="Attention implementation to measure with: sdpa, eager (default: the model's own)."),
    ] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Time the encoder, prefill and generation of every method against the unpruned model, with FLOPs."""
    import json

    import torch

    from flowcut.data.shapes import make_sample
    from flowcut.tools.bench.run import BenchSetting, benchmark, environment, to_dict, to_markdown
    from flowcut.tools.bench.run import plot as plot_speedups

    if plot:
        _require_matplotlib("the plot needs matplotlib: pip install 'flowcut-vlm[plot]', or pass --no-plot")
    if attention not in (None, "sdpa", "eager"):
        _fail(f"--attention must be sdpa or eager, got {attention!r}")
    _at_least(rounds, 1, "--rounds")
    _at_least(warmup, 0, "--warmup")
    if generate:
        _at_least(new_tokens, 2, "--new-tokens (decode speed compares it with a one-token generate)")
    if frames is not None:
        _at_least(frames, 1, "--frames")
    if text_layers is not None:
        _at_least(text_layers, 1, "--text-layers")
    names = _name_list(methods)
    keeps = _int_list(budgets, "budgets")
    try:
        settings = [BenchSetting(None)] + [BenchSetting.parse(name, keep) for name in names for keep in keeps]
    except (TypeError, ValueError) as error:
        _fail(str(error))
    if image is not None and video is not None:
        _fail("pass either --image or --video")
    frame_count, clip = frames, None
    if preset is not None:
        from flowcut.tools.bench.presets import PRESETS

        if preset in PRESETS and PRESETS[preset].frames:
            frame_count = frames or PRESETS[preset].frames
            if image is not None:
                _fail(f"--preset {preset} is a video model: pass --video, or nothing for a video of shapes pictures")
            if video is None:
                import numpy as np

                pictures = [make_sample("test", index + 1).image for index in range(frame_count)]
                clip = np.stack([np.asarray(picture.resize(pictures[0].size)) for picture in pictures])
    if video is not None:
        clip = _read_video(video, frame_count or 8)
    elif frames is not None and clip is None:
        _fail("--frames applies to --video and to video presets")
    picture = _open_image(image) if image is not None else make_sample("test", 1).image
    if image is None and preset is not None and preset in PRESETS and PRESETS[preset].picture_size:
        side = PRESETS[preset].picture_size  # the preset's reference resolution (LLaVA-NeXT: 2×2 crops)
        picture = picture.resize((side, side))
    device, dtype = _resolve_device_dtype(device, dtype)
    if preset is None:
        if text_layers is not None or smoke:
            _fail("--text-layers and --smoke apply to --preset models")
        loaded_model, processor = load_model(_model_source(model), device, dtype)
    else:
        if model is not None:
            _fail("pass either --model or --preset, not both")
        from flowcut.tools.bench.presets import build_preset

        try:
            loaded_model, processor = build_preset(preset, text_layers, smoke, getattr(torch, dtype))
        except ValueError as error:
            _fail(str(error))
        loaded_model.to(device)
    if attention is not None:
        loaded_model.set_attn_implementation(attention)
    with _progress() as progress:
        task = progress.add_task(f"{len(settings)} settings × {rounds} rounds (after {warmup} warm-up)", total=rounds)
        try:
            results = benchmark(
                loaded_model,
                processor,
                picture,
                prompt,
                settings,
                rounds=rounds,
                warmup=warmup,
                new_tokens=new_tokens,
                on_round=lambda done: progress.update(task, completed=done),
                video=clip,
                generate=generate,
                memory=memory,
            )
        except (TypeError, ValueError) as error:
            _fail(str(error))
    env = environment(loaded_model)
    output.mkdir(parents=True, exist_ok=True)
    table = to_markdown(results, env)
    (output / "bench.md").write_text(table)
    (output / "bench.json").write_text(json.dumps(to_dict(results, env), indent=1) + "\n")
    written = [output / "bench.md", output / "bench.json"]
    if plot:
        written.append(plot_speedups(results, output / "bench.png"))
    report.print(table, markup=False)
    report.print("wrote " + ", ".join(str(path) for path in written))


def main() -> None:
    """Console-script entry point."""
    app()
