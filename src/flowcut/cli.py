"""The ``flowcut`` command line: answer a question about an image with a pruned model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

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
    console.print(f"[bold red]error:[/bold red] {message}")
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


def build_prompt(processor: Any, question: str) -> str:
    """The model's chat format around one image and the question (a LLaVA-1.5 prompt without a template)."""
    if "<image>" in question:
        return question
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


@app.command()
def generate(
    image: Annotated[Path, typer.Option(help="Image file to ask about.")],
    prompt: Annotated[str, typer.Option(help="Question about the image.")],
    model: Annotated[str, typer.Option(help="Local model directory or Hugging Face Hub id.")],
    keep: Annotated[int, typer.Option(help="Visual tokens per image that reach the language model.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 32,
    device: Annotated[str, typer.Option(help="'auto', 'cpu', 'cuda', 'cuda:1', …")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="'auto' (float16 on GPU, float32 on CPU), float32, float16, bfloat16.")
    ] = "auto",
) -> None:
    """Answer PROMPT about IMAGE with FlowCut keeping KEEP visual tokens per image."""
    import torch
    from PIL import Image, UnidentifiedImageError

    import flowcut

    if not image.is_file():
        _fail(f"image file not found: {image}")
    try:
        picture = Image.open(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        _fail(f"cannot read image {image}: {error}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        _fail(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    try:
        flowcut.FlowCutConfig(keep=keep)
    except (TypeError, ValueError) as error:
        _fail(str(error))

    loaded_model, processor = load_model(model, device, dtype)
    try:
        handle = flowcut.apply(loaded_model, processor=processor, keep=keep)
    except (TypeError, ValueError) as error:
        _fail(str(error))
    inputs = processor(images=picture, text=build_prompt(processor, prompt), return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, dtype))

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
    report.print(
        f"tokens kept: {handle.tokens_per_image} of {trace.num_patches} per image "
        f"({100 * (1 - handle.tokens_per_image / trace.num_patches):.1f}% pruned)"
    )
    report.print(
        f"prefill (vision encoder + prompt): {1000 * (first_pass_end[0] - start):.1f} ms, "
        f"total: {1000 * total:.1f} ms for {new_tokens.numel()} new tokens on {device} ({dtype})"
    )


def main() -> None:
    """Console-script entry point."""
    app()
