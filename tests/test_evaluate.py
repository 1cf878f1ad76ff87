"""flowcut eval: settings, answer extraction, report files, and the CLI command on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import flowcut
from flowcut import compat
from flowcut.data.shapes import object_patches, samples
from flowcut.methods.random_sample import random_patches
from flowcut.testing import build_tiny_llava, save_tiny_llava
from flowcut.tools.cli import DEFAULT_METHODS as CLI_METHODS
from flowcut.tools.cli import app
from flowcut.tools.evaluate import (
    METHODS,
    EvalReport,
    Result,
    Setting,
    evaluate,
    first_answers,
    information_flow,
    last_token_logits,
    settings_for,
)
from flowcut.tools.prompting import build_prompt


def test_settings_unpruned_first_then_methods_by_budget():
    settings = settings_for(["flowcut", "random"], [64, 192])
    assert settings == [
        Setting(None),
        Setting("flowcut", 192),
        Setting("flowcut", 64),
        Setting("random", 192),
        Setting("random", 64),
    ]
    assert settings[3].config() == flowcut.FlowCutConfig(keep=192, method="random")
    assert settings_for(["one-shot"], [8])[1].config().schedule == "one_shot"
    assert set(CLI_METHODS) <= set(METHODS)
    for name in METHODS:
        assert Setting(name, 32).config().keep == 32  # every evaluated method is a valid configuration


@pytest.mark.parametrize(
    ("methods", "budgets", "message"),
    [
        (["flowcut", "fastvv"], [64], "unknown method\\(s\\) fastvv; available: flowcut, one-shot, uniform-counts"),
        (["flowcut"], [], "at least one budget"),
        (["flowcut"], [0], "keep must be at least 1"),
    ],
)
def test_settings_errors(methods, budgets, message):
    with pytest.raises(ValueError, match=message):
        settings_for(methods, budgets)


def test_last_token_logits_for_left_and_right_padding():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(last_token_logits(logits, right), torch.stack([logits[0, 1], logits[1, 3]]))
    assert torch.equal(last_token_logits(logits, left), torch.stack([logits[0, 3], logits[1, 3]]))


def test_first_answers_equal_greedy_generation(tiny):
    model, processor = tiny
    questions = list(samples("test", 3))
    with flowcut.apply(model, processor=processor, keep=16):
        answers = first_answers(model, processor, questions)
        for sample, answer in zip(questions, answers, strict=True):
            inputs = processor(images=sample.image, text=build_prompt(processor, sample.question), return_tensors="pt")
            with torch.no_grad():
                token = model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1]
            assert answer == processor.tokenizer.decode([int(token)]).strip()


def test_evaluate_counts_every_question_and_restores_model_and_processor(tiny):
    model, processor = tiny
    questions = list(samples("test", 5))
    settings = settings_for(["flowcut", "random"], [16])
    done = []
    results = evaluate(model, processor, questions, settings, batch_size=2, on_batch=done.append)
    assert done == [2, 2, 1] * 3
    assert [(r.method, r.keep, r.total) for r in results] == [(None, 144, 5), ("flowcut", 16, 5), ("random", 16, 5)]
    for result in results:
        assert sum(total for _, total in result.per_kind.values()) == 5
        assert sum(correct for correct, _ in result.per_kind.values()) == result.correct
    assert flowcut.get_handle(model) is None and "replace_image_token" not in processor.__dict__
    # Same answers whatever the batch size.
    assert [r.correct for r in evaluate(model, processor, questions, settings, batch_size=5)] == [
        r.correct for r in results
    ]


def sample_report() -> EvalReport:
    results = [
        Result(None, 576, "unpruned", 80, 100, {"colour": [40, 50], "count": [40, 50]}),
        Result("flowcut", 64, "FlowCut", 76, 100, {"colour": [38, 50], "count": [38, 50]}, 90.0, 100),
        Result("flowcut", 32, "FlowCut", 60, 100, {"colour": [30, 50], "count": [30, 50]}),
        Result("random", 64, "random", 40, 100, {"colour": [20, 50], "count": [20, 50]}),
        Result("random", 32, "random", 20, 100, {"colour": [10, 50], "count": [10, 50]}),
    ]
    flow = {"entropy_ratio": [0.9, 0.5], "object_share": [0.1, 0.62], "object_area": [0.05]}
    return EvalReport("model", "test", 0, 100, 576, results, flow)


def test_report_tables_and_files(tmp_path):
    report = sample_report()
    assert report.retention(report.find("flowcut", 64)) == pytest.approx(0.95)
    markdown = report.to_markdown()
    assert "unpruned (576 tokens): **80.0 %**" in markdown
    assert "| FlowCut | 76.0 % (95.0 %) | 60.0 % (75.0 %) |" in markdown
    assert "| random | 40.0 % (50.0 %) | 20.0 % (25.0 %) |" in markdown
    assert "| FlowCut, keep 64 | 76.0 | 76.0 |" in markdown
    assert "| FlowCut | 90.0 | – |" in markdown  # object-patch recall, measured for one setting only
    assert "(objects cover 5.0 % of patches)" in markdown
    assert "| entropy ratio | 0.90 | 0.50 |" in markdown and "| object share | 0.10 | 0.62 |" in markdown
    written = report.save(tmp_path)
    assert [path.name for path in written] == ["eval.json", "eval.md", "eval.png"]
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["results"][1]["retention"] == pytest.approx(0.95)
    assert data["results"][1]["object_recall"] == pytest.approx(0.9) and data["results"][2]["object_recall"] is None
    assert data["information_flow"]["object_share"] == [0.1, 0.62]
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_on_a_tiny_model(tmp_path):
    model = save_tiny_llava(tmp_path / "model", seed=0)
    output = tmp_path / "results"
    runner = CliRunner()
    arguments = ["eval", "--model", str(model), "--count", "3", "--budgets", "16,8", "--methods", "flowcut,random"]
    result = runner.invoke(app, [*arguments, "--output", str(output), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "| method | keep 16 | keep 8 |" in result.output
    data = json.loads((output / "eval.json").read_text())
    assert [(row["method"], row["keep"], row["total"]) for row in data["results"]] == [
        (None, 144, 3),
        ("flowcut", 16, 3),
        ("flowcut", 8, 3),
        ("random", 16, 3),
        ("random", 8, 3),
    ]
    assert (output / "eval.png").exists()
    bad = runner.invoke(app, [*arguments[:-2], "--methods", "flowcut,fastvv", "--output", str(output)])
    assert bad.exit_code == 2 and "unknown method(s) fastvv" in bad.output
    shallow = runner.invoke(app, [*arguments[:-2], "--methods", "flowcut,fastv", "--output", str(output)])
    assert shallow.exit_code == 2 and "needs a later layer" in shallow.output and "settings ×" not in shallow.output


@pytest.fixture(scope="module")
def llava_grid_model():
    """A tiny random model with LLaVA-1.5's 336-px, 24×24 patch geometry (the shapes images' grid)."""
    return build_tiny_llava(seed=0, image_size=336, patch_size=14, vision_layers=3, vision_hidden=32)


def test_object_recall_counts_kept_object_patches(llava_grid_model):
    model, processor = llava_grid_model
    questions = list(samples("test", 3))
    [result] = evaluate(model, processor, questions, [Setting("random", 100)], batch_size=2)
    expected = []
    for sample in questions:
        pixel_values = processor.image_processor(sample.image, return_tensors="pt").pixel_values[0]
        kept = set(random_patches(pixel_values, 576, 100, 0).tolist())
        objects = object_patches(sample.objects)
        expected.append(len(objects & kept) / len(objects))
    assert result.recall_count == 3 and result.object_recall == pytest.approx(sum(expected) / 3)


def test_information_flow_per_layer(llava_grid_model):
    model, processor = llava_grid_model
    flow = information_flow(model, processor, list(samples("test", 4)))
    assert len(flow["entropy_ratio"]) == len(flow["object_share"]) == 3
    assert all(0 < value <= 1 for value in flow["entropy_ratio"])
    assert all(0 <= value <= 1 for value in flow["object_share"])
    assert 0 < flow["object_area"][0] < 0.2
    # The model's own attention implementation is untouched.
    assert compat.attention_implementation(model.model.vision_tower.config) == "sdpa"


def test_information_flow_needs_a_clip_image_tower():
    from flowcut.testing import build_tiny_qwen

    model, processor = build_tiny_qwen("2")
    with pytest.raises(ValueError, match="information flow reads a CLIP image tower; Qwen2VLForConditionalGeneration"):
        information_flow(model, processor, [])
