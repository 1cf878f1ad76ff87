"""The reference model's training recipe: data formatting, labels, schedule, and a two-step smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from flowcut.data.shapes import make_conversation
from flowcut.reference.train import _learning_rate, answer_labels, conversation_text, main


def test_conversations_are_deterministic_and_distinct():
    first, again = make_conversation("train", 7, 6), make_conversation("train", 7, 6)
    assert first.turns == again.turns and first.image.tobytes() == again.image.tobytes()
    questions = [question for question, _, _ in first.turns]
    assert 1 <= len(questions) <= 6 and len(set(questions)) == len(questions)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make_conversation("dev", 0, 2)


def test_conversation_text_puts_the_image_in_the_first_turn():
    turns = (("how many objects are there ?", "two", "count"), ("is there a red circle ?", "no", "exists"))
    assert conversation_text(turns) == (
        "USER: <image>\nhow many objects are there ? ASSISTANT: two</s>USER: is there a red circle ? ASSISTANT: no</s>"
    )


def test_answer_labels_mark_answer_and_end_of_turn_only():
    assistant, colon, eos = 5, 6, 3
    ids = np.array([[9, assistant, colon, 40, eos, 9, 9, assistant, colon, 41, eos, 0]])
    labels = answer_labels(ids, assistant, colon)
    assert labels.tolist() == [[-100, -100, -100, 40, eos, -100, -100, -100, -100, 41, eos, -100]]


def test_learning_rate_warms_up_then_decays_to_zero():
    assert _learning_rate(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert _learning_rate(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert _learning_rate(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert _learning_rate(55, 100, 1.0, 10) == pytest.approx(0.5)
    assert _learning_rate(100, 100, 1.0, 10) == pytest.approx(0.0)


@pytest.mark.slow
def test_two_step_training_run_is_reproducible_and_loadable(tmp_path):
    small = ["--vision-layers", "2", "--vision-hidden", "32", "--text-layers", "1", "--text-hidden", "32"]
    steps = ["--stage1-steps", "2", "--stage2-steps", "2", "--warmup-steps", "1"]
    for run in ("first", "second"):
        arguments = [*small, *steps, "--stage1-batch", "2", "--stage2-batch", "2", "--turns", "2"]
        main(["--output", str(tmp_path / run), *arguments])
    first, second = (load_file(tmp_path / run / "model.safetensors") for run in ("first", "second"))
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    tmp_path = tmp_path / "first"
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.num_hidden_layers == 2
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert [(entry["stage"], entry["step"]) for entry in log["log"]] == [(1, 2), (2, 2)]
    assert log["recipe"]["stage1_steps"] == 2
    assert not (tmp_path / "vision_stage1.safetensors").exists()


@pytest.mark.slow
def test_training_with_the_auxiliary_patch_loss_reports_patch_accuracy(tmp_path):
    small = ["--vision-layers", "2", "--vision-hidden", "32", "--text-layers", "1", "--text-hidden", "32"]
    steps = ["--stage1-steps", "1", "--stage2-steps", "1", "--warmup-steps", "1", "--turns", "2"]
    batches = ["--stage1-batch", "2", "--stage2-batch", "2"]
    main(["--output", str(tmp_path), *small, *steps, *batches, "--dense-weight", "1"])
    stage1 = json.loads((tmp_path / "training_log.json").read_text())["log"][0]
    assert stage1["stage"] == 1 and 0.0 <= stage1["object_patch_accuracy"] <= 1.0
