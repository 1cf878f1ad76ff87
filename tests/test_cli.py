"""The ``flowcut`` command line on a tiny saved model."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import make_image
from flowcut.testing import (
    build_processor,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_qwen,
    save_tiny_llava,
)
from flowcut.tools.cli import app
from flowcut.tools.prompting import build_prompt

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    save_tiny_llava(directory / "model", seed=0)
    image = directory / "image.png"
    make_image(0).save(image)
    return directory / "model", image


def test_generate_prints_answer_budget_and_timings(saved):
    model, image = saved
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(model),
            "--image",
            str(image),
            "--prompt",
            "what colour ?",
            "--keep",
            "16",
            "--max-new-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "tokens kept: 16 of 144 per image (88.9% pruned)" in result.output
    assert (
        "prefill (vision encoder + prompt; a cold first call" in result.output
        and "for 4 new tokens on cpu" in result.output
    )


def test_generate_rejects_bad_keep(saved):
    model, image = saved
    result = runner.invoke(
        app, ["generate", "--model", str(model), "--image", str(image), "--prompt", "x", "--keep", "0"]
    )
    assert result.exit_code == 2
    assert "keep must be at least 1" in result.output


@pytest.mark.parametrize(("method", "kept"), [("visionzip", "16 of 144"), ("none", "144 of 144")])
def test_generate_runs_any_registered_method(saved, method, kept):
    model, image = saved
    arguments = ["generate", "--model", str(model), "--image", str(image), "--prompt", "x", "--keep", "16"]
    result = runner.invoke(app, [*arguments, "--method", method, "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert f"tokens kept: {kept} per image" in result.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--method", "fastvv"], "unknown method 'fastvv'; available: flowcut, divprune"),
        (["--method", "pool", "--counts", "uniform"], "counts='uniform' is a FlowCut setting"),
    ],
)
def test_generate_rejects_bad_method_options(saved, options, message):
    model, image = saved
    arguments = ["generate", "--model", str(model), "--image", str(image), "--prompt", "x"]
    result = runner.invoke(app, [*arguments, *options])
    assert result.exit_code == 2 and message in result.output


def test_generate_missing_image(saved, tmp_path):
    model, _ = saved
    result = runner.invoke(
        app, ["generate", "--model", str(model), "--image", str(tmp_path / "no.png"), "--prompt", "x"]
    )
    assert result.exit_code == 2 and "image file not found" in result.output


def test_generate_not_a_model_directory(saved, tmp_path):
    _, image = saved
    result = runner.invoke(app, ["generate", "--model", str(tmp_path), "--image", str(image), "--prompt", "x"])
    assert result.exit_code == 2 and "holds no config.json" in result.output


def test_prompt_uses_chat_template():
    processor = build_processor(84, 7)
    assert build_prompt(processor, "what colour ?") == "USER: <image>\nwhat colour ? ASSISTANT:"
    processor.chat_template = None
    assert build_prompt(processor, "hi") == "USER: <image>\nhi ASSISTANT:"
    assert build_prompt(processor, "USER: <image> x") == "USER: <image> x"
    assert build_prompt(processor, "hi", "video") == "USER: <video>\nhi ASSISTANT:"
    assert build_prompt(processor, "<|video_pad|> x", "video") == "<|video_pad|> x"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("flowcut-vlm ")


def test_generate_warns_about_words_the_tokenizer_does_not_know(saved):
    model, image = saved
    arguments = ["generate", "--model", str(model), "--image", str(image), "--max-new-tokens", "1"]
    result = runner.invoke(app, [*arguments, "--prompt", "What colour is the Circle ?"])
    assert result.exit_code == 0, result.output
    assert "words this model's tokenizer does not know: Circle, What" in result.output
    known = runner.invoke(app, [*arguments, "--prompt", "what colour is the circle ?"])
    assert "does not know" not in known.output


def test_generate_on_llava_next_reports_both_stages(tmp_path):
    model, processor = build_tiny_llava_next(seed=0, vision_layers=6, text_layers=4)
    model.save_pretrained(tmp_path / "next")
    processor.save_pretrained(tmp_path / "next")
    image = tmp_path / "wide.png"
    make_image(0, size=84).resize((150, 60)).save(image)
    arguments = ["generate", "--model", str(tmp_path / "next"), "--image", str(image), "--prompt", "what colour ?"]
    result = runner.invoke(app, [*arguments, "--keep", "64", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    # The stock model gives this 150x60 image 144 (base) + 10 x 24 (unpadded 1x2-crop grid) + 10 (newlines) tokens;
    # FlowCut's encoder keeps 32 patches of the base view and of each crop, decoder layer 1 keeps 64.
    assert "visual tokens: 64 of 394 (83.8% pruned); 96 enter the language model" in result.output
    ratio = runner.invoke(app, [*arguments, "--keep", "0.25", "--max-new-tokens", "2"])
    assert ratio.exit_code == 0, ratio.output
    assert "visual tokens: 98 of 394" in ratio.output  # round(0.25 * 394) = 98 (half to even)
    encoder_only = runner.invoke(app, [*arguments, "--keep", "64", "--stages", "encoder", "--max-new-tokens", "2"])
    assert encoder_only.exit_code == 0, encoder_only.output
    assert "visual tokens: 64 of 394 (83.8% pruned); all chosen in the vision encoder" in encoder_only.output


@pytest.mark.parametrize("family", ["onevision", "qwen2", "qwen2.5"])
def test_generate_on_families_whose_processors_need_torchvision_to_load(family, tmp_path, monkeypatch):
    """Their saved processors need a video processor (torchvision) to load, so the model is handed in directly."""
    if family == "onevision":
        built = build_tiny_llava_onevision(text_layers=4)
    else:
        built = build_tiny_qwen(family.removeprefix("qwen"))
    monkeypatch.setattr("flowcut.tools.cli.load_model", lambda *args: built)
    monkeypatch.setattr("flowcut.tools.cli._model_source", lambda model: "tiny")
    image = tmp_path / "wide.png"
    make_image(0, size=84).resize((150, 60)).save(image)
    arguments = ["generate", "--image", str(image), "--prompt", "what colour ?", "--keep", "0.2"]
    result = runner.invoke(app, [*arguments, "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "visual tokens:" in result.output and "continue after decoder layer 1" in result.output
