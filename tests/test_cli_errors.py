"""CLI misuse: one line ``error: …`` saying what to do, exit code 2, never a traceback (one row per misuse)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from flowcut.tools.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def files(saved_llava):
    return saved_llava


def generate(*options: str) -> list[str]:
    return ["generate", "--model", "{model}", "--image", "{image}", "--prompt", "what colour ?", *options]


ROWS = [
    # generate
    (generate("--device", "tpu"), "unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
    (generate("--device", "cuda:x"), "unknown device 'cuda:x'"),
    (generate("--device", "meta"), "flowcut runs on cpu, cuda or mps"),
    (generate("--max-new-tokens", "0"), "--max-new-tokens must be at least 1, got 0"),
    (generate("--keep", "many"), "--keep must be a number of tokens or a ratio in (0, 1), got 'many'"),
    (generate("--keep", "0"), "keep must be at least 1 visual token per image, got 0"),
    (generate("--method", "tome"), "unknown method 'tome'"),
    (generate("--dtype", "float8"), "unknown dtype 'float8'; choose from auto, float32, float16, bfloat16"),
    (generate("--counts", "x"), "unknown counts 'x'; available: adaptive, uniform"),
    (generate("--criteria", "x"), "unknown criteria 'x'; available: all, relation"),
    (generate("--ema-weight", "2"), "ema_weight must be in [0, 1), got 2.0"),
    (generate("--prune-interval", "0"), "prune_interval must be a positive integer, got 0"),
    (generate("--stages", "language"), "unknown stages 'language'; available: auto, encoder"),
    (generate("--method", "fastv", "--stages", "encoder"), "'fastv' prunes only inside the language model"),
    (generate("--schedule", "sometimes"), "unknown schedule 'sometimes'; available: progressive, one_shot"),
    (
        ["generate", "--model", "{model}", "--image", "{image}", "--prompt", "<image> <image> what ?"],
        "the prompt holds 2 image placeholders (<image>) for 1 image(s)",
    ),
    (["generate", "--model", "{model}", "--image", "{missing}", "--prompt", "what ?"], "image file not found"),
    # viz
    (
        ["viz", "--model", "{model}", "--image", "{image}", "--output", "{dir}/figure.pdf"],
        "--output must end in .png or .svg, got 'figure.pdf'",
    ),
    (["viz", "--model", "{model}", "--output", "{dir}/figure.png"], "pass either --image or --video"),
    (
        ["viz", "--model", "{model}", "--image", "{image}", "--dpi", "0", "--output", "{dir}/f.png"],
        "--dpi must be at least 1, got 0",
    ),
    (
        ["viz", "--model", "{model}", "--image", "{image}", "--method", "tome", "--output", "{dir}/f.png"],
        "unknown method 'tome'",
    ),
    (
        ["viz", "--model", "{model}", "--image", "{image}", "--device", "tpu", "--output", "{dir}/f.png"],
        "unknown device 'tpu'",
    ),
    (["viz", "--model", "{model}", "--image", "{image}", "--layers", "x"], "--layers takes comma-separated integers"),
    (["viz", "--model", "{model}", "--image", "{image}", "--frames", "0"], "--frames must be at least 1, got 0"),
    (["viz", "--model", "{model}", "--video", "{missing}"], "video not found"),
    (
        ["viz", "--model", "{model}", "--image", "{image}", "--layers", "99", "--output", "{dir}/f.png"],
        "layers [99] were not scored for this image; scored layers: [0, 1,",
    ),
    # bench
    (["bench", "--model", "{model}", "--attention", "flex", "--no-plot"], "--attention must be sdpa or eager"),
    (["bench", "--preset", "nope", "--no-plot"], "unknown preset 'nope'; available: llava-1.5-7b"),
    (["bench", "--model", "{model}", "--frames", "0", "--no-plot"], "--frames must be at least 1, got 0"),
    (["bench", "--image", "{image}", "--video", "{missing}", "--no-plot"], "pass either --image or --video"),
    (["bench", "--model", "{model}", "--preset", "llava-1.5-7b", "--no-plot"], "pass either --model or --preset"),
    (["bench", "--model", "{model}", "--rounds", "0", "--no-plot"], "--rounds must be at least 1, got 0"),
    (["bench", "--model", "{model}", "--warmup", "-1", "--no-plot"], "--warmup must be at least 0, got -1"),
    (["bench", "--model", "{model}", "--new-tokens", "1", "--no-plot"], "--new-tokens (decode speed"),
    (["bench", "--model", "{model}", "--budgets", "64,x", "--no-plot"], "--budgets takes comma-separated integers"),
    (["bench", "--model", "{model}", "--device", "tpu", "--no-plot"], "unknown device 'tpu'"),
    (["bench", "--preset", "llava-1.5-7b", "--text-layers", "0", "--no-plot"], "--text-layers must be at least 1"),
    (["bench", "--model", "{model}", "--smoke", "--no-plot"], "--text-layers and --smoke apply to --preset models"),
    # eval
    (["eval", "--model", "{model}", "--count", "0", "--no-plot"], "--count and --batch-size must be at least 1"),
    (["eval", "--model", "{model}", "--batch-size", "0", "--no-plot"], "--count and --batch-size must be at least 1"),
    (["eval", "--model", "{model}", "--start", "-1", "--no-plot"], "and --start at least 0"),
    (["eval", "--model", "{model}", "--methods", "tome", "--no-plot"], "unknown method(s) tome; available: flowcut,"),
    (["eval", "--model", "{model}", "--split", "dev", "--no-plot"], "unknown split 'dev'"),
    (["eval", "--model", "{model}", "--budgets", "a", "--no-plot"], "--budgets takes comma-separated integers"),
    (["eval", "--model", "{model}", "--device", "tpu", "--no-plot"], "unknown device 'tpu'"),
]
if not torch.cuda.is_available():
    ROWS.append((generate("--device", "cuda"), "torch sees no CUDA GPU here"))


@pytest.mark.parametrize(("command", "message"), ROWS, ids=[" ".join(row[0][:1] + row[0][5:]) for row in ROWS])
def test_misuse_gives_one_line_and_exit_code_2(files, command, message):
    places = {"model": files / "model", "image": files / "image.png", "missing": files / "no.png", "dir": files}
    result = runner.invoke(app, [part.format(**places) for part in command])
    assert isinstance(result.exception, SystemExit), result.output  # a traceback is a crash, not an error
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], result.output


def test_error_messages_keep_brackets_that_look_like_markup(monkeypatch):
    """Rich markup would swallow ``[viz]`` in an install hint and leave a wrong command."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = runner.invoke(app, ["viz", "--image", "x.png"])
    assert result.exit_code == 2
    assert "pip install 'flowcut-vlm[viz]'" in result.output


@pytest.mark.parametrize("command", ["generate", "viz", "bench", "eval"])
def test_help_lists_the_valid_values(command):
    from flowcut.config import METHODS
    from flowcut.tools.bench.presets import PRESETS

    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "'cpu', 'cuda', 'cuda:N', 'mps'" in text and "float32, float16, bfloat16" in text
    methods = METHODS if command != "eval" else ("flowcut", "visionzip", "fastv")
    assert all(method in text for method in methods)
    if command == "bench":
        assert all(name in text for name in PRESETS)
