"""The lmms-eval integration's own logic, without lmms-eval (tests_lmms/ runs lmms-eval itself)."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import flowcut
from conftest import picture
from flowcut.config import FlowCutConfig
from flowcut.data.shapes import samples
from flowcut.integrations import lmms_eval as integration
from flowcut.testing import build_tiny_llava, build_tiny_llava_next, build_tiny_qwen
from flowcut.tools.prompting import prompt_inputs

HAS_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None


def test_model_args_split_into_flowcut_settings_and_wrapper_arguments():
    config, rest = integration.split_model_args(
        {"pretrained": "llava-hf/llava-1.5-7b-hf", "keep": 64, "method": "visionzip", "device_map": "cuda:0"}
    )
    assert config == FlowCutConfig(keep=64, method="visionzip")
    assert rest == {"pretrained": "llava-hf/llava-1.5-7b-hf", "device_map": "cuda:0"}
    ratio, _ = integration.split_model_args({"keep": 0.111, "schedule": "one_shot", "ema_weight": 0.0})
    assert (ratio.keep, ratio.schedule, ratio.ema_weight) == (0.111, "one_shot", 0.0)
    default, rest = integration.split_model_args({"pretrained": "x"})
    assert (default.keep, default.method, rest) == (64, "flowcut", {"pretrained": "x"})


def test_invalid_flowcut_model_args_raise_flowcuts_errors():
    with pytest.raises(ValueError, match="keep must be at least 1 visual token per image, got 0"):
        integration.split_model_args({"keep": 0})
    with pytest.raises(ValueError, match="unknown method"):
        integration.split_model_args({"method": "flowkut"})
    with pytest.raises(ValueError, match="schedule='one_shot' is a FlowCut setting"):
        integration.split_model_args({"method": "fastv", "schedule": "one_shot"})


def test_llava_hf_device_map_defaults_to_the_device_in_a_single_process_only(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert integration.single_process_device_map({"pretrained": "x"}) == {"pretrained": "x", "device_map": "cuda"}
    assert integration.single_process_device_map({"device": "cpu"}) == {"device": "cpu", "device_map": "cpu"}
    assert integration.single_process_device_map({"device_map": "auto"}) == {"device_map": "auto"}
    monkeypatch.setenv("WORLD_SIZE", "8")  # accelerate launch: the wrapper places each copy on cuda:{rank}
    assert integration.single_process_device_map({"pretrained": "x"}) == {"pretrained": "x"}


def test_the_task_holds_flowcut_evals_questions_and_exact_pixels(tmp_path):
    yaml_path = integration.write_shapes_task(tmp_path / "task", count=5, start=3)
    records = [json.loads(line) for line in (tmp_path / "task" / f"{integration.TASK_NAME}.jsonl").open()]
    expected = list(samples("test", 5, 3))
    assert [r["index"] for r in records] == [3, 4, 5, 6, 7]
    assert [(r["question"], r["answer"], r["kind"]) for r in records] == [
        (s.question, s.answer, s.kind) for s in expected
    ]
    for record, sample in zip(records, expected, strict=True):
        (image,) = integration.shapes_doc_to_visual(record)
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(sample.image.convert("RGB")))
        assert integration.shapes_doc_to_text(record) == sample.question
    text = yaml_path.read_text()
    assert f"task: {integration.TASK_NAME}\n" in text
    assert f'test: "{(tmp_path / "task" / integration.TASK_NAME).resolve()}.jsonl"' in text
    assert "max_new_tokens: 1\n" in text  # the first greedy token is the answer, as in flowcut eval


def test_the_task_yaml_names_functions_that_exist():
    text = integration.task_yaml(integration.TASK_NAME, Path("/data/x.jsonl"))
    names = [line.split("!function ")[1] for line in text.splitlines() if "!function" in line]
    assert len(names) == 3
    for name in names:
        module, function = name.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), function))


def test_task_rejects_empty_ranges(tmp_path):
    with pytest.raises(ValueError, match="count must be at least 1"):
        integration.write_shapes_task(tmp_path, count=0)


def test_answers_are_judged_like_flowcut_eval():
    doc = {"answer": "red"}
    assert integration.shapes_process_results(doc, ["red"]) == {"accuracy": 1.0}
    assert integration.shapes_process_results(doc, [" red "]) == {"accuracy": 1.0}
    assert integration.shapes_process_results(doc, [SimpleNamespace(text="red")]) == {"accuracy": 1.0}
    assert integration.shapes_process_results(doc, ["blue"]) == {"accuracy": 0.0}
    assert integration.shapes_process_results(doc, [""]) == {"accuracy": 0.0}  # e.g. an end-of-sequence token


def write_lmms_results(directory, accuracy: float, samples_count: int, name: str = "x_results.json") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "results": {integration.TASK_NAME: {"accuracy,none": accuracy, "accuracy_stderr,none": 0.03}},
        "n-samples": {integration.TASK_NAME: {"original": samples_count, "effective": samples_count}},
    }
    (directory / name).write_text(json.dumps(data))


def write_eval_json(path) -> None:
    rows = [
        {"method": None, "keep": 576, "correct": 132, "total": 200},
        {"method": "flowcut", "keep": 64, "correct": 125, "total": 200},
        {"method": "flowcut", "keep": 32, "correct": 119, "total": 200},
    ]
    path.write_text(json.dumps({"results": rows}))


def test_scores_are_read_and_compared_exactly(tmp_path):
    write_lmms_results(tmp_path / "lmms" / "model", 0.625, 200)
    write_eval_json(tmp_path / "eval.json")
    lmms = integration.read_lmms_score(tmp_path / "lmms")
    assert lmms == integration.Score(125, 200)
    assert integration.read_flowcut_eval_score(tmp_path / "eval.json", None) == integration.Score(132, 200)
    assert integration.read_flowcut_eval_score(tmp_path / "eval.json", "flowcut", 32) == integration.Score(119, 200)
    flowcut_64 = integration.read_flowcut_eval_score(tmp_path / "eval.json", "flowcut", 64)
    assert integration.compare_scores(lmms, flowcut_64) == (
        "scores match: lmms-eval 125/200 (62.50 %), flowcut eval 125/200 (62.50 %)"
    )
    with pytest.raises(ValueError, match=r"scores differ: lmms-eval 125/200 \(62.50 %\), flowcut eval 119/200"):
        integration.compare_scores(lmms, integration.Score(119, 200))
    with pytest.raises(ValueError, match="scores differ"):
        integration.compare_scores(integration.Score(125, 199), flowcut_64)
    with pytest.raises(KeyError, match="no row for method='visionzip', keep=64"):
        integration.read_flowcut_eval_score(tmp_path / "eval.json", "visionzip", 64)


def test_reading_broken_or_missing_lmms_results_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lmms-eval results"):
        integration.read_lmms_score(tmp_path)
    write_lmms_results(tmp_path / "odd", 0.6251, 200)
    with pytest.raises(ValueError, match="not a whole number of 200 questions"):
        integration.read_lmms_score(tmp_path / "odd")
    write_lmms_results(tmp_path / "other", 0.5, 2)
    with pytest.raises(KeyError, match="no results for task 'pope'"):
        integration.read_lmms_score(tmp_path / "other", task="pope")


def test_command_line_writes_the_task_and_compares(tmp_path, capsys):
    assert integration.main(["write-task", str(tmp_path / "task"), "--count", "2"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{integration.TASK_NAME}.yaml")
    write_lmms_results(tmp_path / "lmms", 0.66, 200)
    write_eval_json(tmp_path / "eval.json")
    arguments = ["compare", "--lmms-output", str(tmp_path / "lmms"), "--eval-json", str(tmp_path / "eval.json")]
    assert integration.main([*arguments, "--method", "unpruned"]) == 0
    assert "unpruned: scores match: lmms-eval 132/200" in capsys.readouterr().out
    assert integration.main([*arguments, "--method", "flowcut", "--keep", "64"]) == 1
    assert "error: scores differ: lmms-eval 132/200 (66.00 %), flowcut eval 125/200" in capsys.readouterr().err


@pytest.mark.skipif(HAS_LMMS_EVAL, reason="checks the import error of an environment without lmms-eval")
def test_the_module_imports_without_lmms_eval_and_its_classes_need_it():
    with pytest.raises(ModuleNotFoundError, match="lmms_eval"):
        _ = integration.LlavaHfChatFlowCut
    with pytest.raises(ModuleNotFoundError, match="lmms_eval"):
        integration.model_manifests()


def test_unknown_attributes_are_attribute_errors():
    with pytest.raises(AttributeError, match="has no attribute 'LlavaFlowCut'"):
        _ = integration.LlavaFlowCut


def prunes_in_language_model_measured(model, processor, config: FlowCutConfig) -> bool:
    """Run one prompt and see whether the language model dropped tokens (the trace's language positions)."""
    processor = copy.deepcopy(processor)
    with flowcut.apply(model, processor=processor, config=config) as handle, torch.no_grad():
        image = picture(84, 84, 0)
        model(**prompt_inputs(processor, image, "what colour is the circle ?", "cpu", torch.float32))
        return handle.last_trace.language_positions is not None


@pytest.mark.parametrize(
    ("build", "config", "expected"),
    [
        (build_tiny_llava, FlowCutConfig(keep=16), False),
        (build_tiny_llava, FlowCutConfig(keep=16, method="visionzip"), False),
        (build_tiny_llava, FlowCutConfig(keep=16, method="fastv"), True),
        (build_tiny_llava, FlowCutConfig(keep=16, method="none"), False),
        (build_tiny_llava_next, FlowCutConfig(keep=16), True),
        (build_tiny_llava_next, FlowCutConfig(keep=16, method="divprune"), False),
        (build_tiny_qwen, FlowCutConfig(keep=4), True),
        (build_tiny_qwen, FlowCutConfig(keep=4, method="visionzip"), False),
    ],
)
def test_the_log_likelihood_rule_matches_where_the_library_prunes(build, config, expected):
    model, processor = build(text_layers=4)  # language-model pruning needs layers after decoder layer 1
    assert integration.prunes_in_language_model(model, config) is expected
    if config.method != "none":
        assert prunes_in_language_model_measured(model, processor, config) is expected
