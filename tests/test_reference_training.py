"""The reference model's training recipe: data formatting, labels, schedule, and a two-step smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from flowcut.data.shapes import ShapeObject, make_conversation, make_scene
from flowcut.reference.train import (
    PAIRS,
    Recipe,
    SceneHead,
    _learning_rate,
    answer_labels,
    build_untrained,
    conversation_text,
    main,
    scene_loss,
    scene_targets,
    sincos_positions,
)


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
    steps = ["--pretrain-steps", "2", "--middle-steps", "1", "--middle-size", "56", "--stage1-steps", "2"]
    steps += ["--stage2-steps", "2", "--warmup-steps", "1"]
    for run in ("first", "second"):
        arguments = [*small, *steps, "--stage1-batch", "2", "--stage2-batch", "2", "--turns", "2"]
        main(["--output", str(tmp_path / run), *arguments])
    first, second = (load_file(tmp_path / run / "model.safetensors") for run in ("first", "second"))
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    tmp_path = tmp_path / "first"
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.num_hidden_layers == 2
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert [(entry["stage"], entry["step"]) for entry in log["log"]] == [("1a", 2), ("1m", 1), ("1b", 2), (2, 2)]
    assert log["recipe"]["stage1_steps"] == 2
    assert not (tmp_path / "vision_stage1.safetensors").exists()


@pytest.mark.slow
def test_stage2_bf16_option_changes_only_the_language_side(tmp_path):
    small = ["--vision-layers", "1", "--vision-hidden", "32", "--text-layers", "1", "--text-hidden", "32"]
    steps = ["--pretrain-steps", "1", "--stage1-steps", "1", "--stage2-steps", "2", "--warmup-steps", "1"]
    batches = ["--stage1-batch", "2", "--stage2-batch", "2", "--turns", "2"]
    for run, flag in (("float32", "false"), ("bf16", "true")):
        main(["--output", str(tmp_path / run), *small, *steps, *batches, "--stage2-bf16", flag])
    float32, bf16 = (load_file(tmp_path / run / "model.safetensors") for run in ("float32", "bf16"))
    vision = [name for name in float32 if "vision_tower" in name]
    assert vision and all(torch.equal(float32[name], bf16[name]) for name in vision)
    head = next(name for name in float32 if name.endswith("lm_head.weight"))
    assert not torch.equal(float32[head], bf16[head])
    assert json.loads((tmp_path / "bf16" / "training_log.json").read_text())["recipe"]["stage2_bf16"] is True
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path / "bad"), *small, *steps, *batches, "--stage2-bf16", "maybe"])


def test_scene_targets_describe_each_present_pair():
    objects = (ShapeObject("circle", "red", "large", 56, 28), ShapeObject("square", "blue", "small", 14, 84))
    targets = scene_targets(objects, 112)
    red_circle, blue_square = PAIRS.index(("red", "circle")), PAIRS.index(("blue", "square"))
    assert np.flatnonzero(targets["presence"]).tolist() == sorted([red_circle, blue_square])
    assert np.flatnonzero(targets["colours"]).tolist() == [0, 2]  # red, blue
    assert np.flatnonzero(targets["shapes"]).tolist() == [0, 1]  # circle, square
    assert targets["count"] == 2
    assert targets["places"][red_circle].tolist() == [0.5, 0.25, 1.0]
    assert targets["places"][blue_square].tolist() == [0.125, 0.75, 0.0]
    assert not targets["places"][np.flatnonzero(targets["presence"] == 0)].any()


def test_scene_loss_ignores_the_places_of_absent_pairs():
    image, objects = make_scene("train", 3, 112, 2)
    assert image.size == (112, 112) and 1 <= len(objects) <= 2
    targets = {key: torch.from_numpy(value)[None] for key, value in scene_targets(objects, 112).items()}
    predicted = SceneHead(8)(torch.zeros(1, 8))
    loss = scene_loss(predicted, targets)
    absent = (targets["presence"][0] == 0).nonzero()[0, 0]
    predicted["places"] = predicted["places"].detach().clone()
    predicted["places"][0, absent] = 100.0
    assert scene_loss(predicted, targets).item() == pytest.approx(loss.item())
    predicted["places"][0, targets["presence"][0].argmax()] = 100.0
    assert scene_loss(predicted, targets).item() > loss.item() + 100


def test_scene_loss_weighs_the_location_error():
    _, objects = make_scene("train", 3, 112, 2)
    targets = {key: torch.from_numpy(value)[None] for key, value in scene_targets(objects, 112).items()}
    predicted = SceneHead(8)(torch.zeros(1, 8))
    present = targets["presence"].bool()
    location = torch.nn.functional.mse_loss(predicted["places"][..., :2][present], targets["places"][..., :2][present])
    without = scene_loss(predicted, targets, location_weight=0.0)
    assert scene_loss(predicted, targets, location_weight=40.0).item() == pytest.approx(
        without.item() + 40 * location.item()
    )


def test_sincos_position_table_by_hand():
    # 2×2 grid, width 4 (one frequency, 1): patch 1 is row 0, column 1; patch 2 is row 1, column 0.
    table = sincos_positions(2, 4)
    s, c = float(torch.tensor(1.0).sin()), float(torch.tensor(1.0).cos())
    expected = torch.tensor([[0, 1, 0, 1], [s, c, 0, 1], [0, 1, s, c], [s, c, s, c]])
    assert torch.allclose(table, expected, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_positions(2, 6)


def _position_table(model) -> torch.Tensor:
    embeddings = next(m for m in model.modules() if type(m).__name__ == "CLIPVisionEmbeddings")
    return embeddings.position_embedding.weight


def test_position_init_option():
    small = {"vision_layers": 1, "text_layers": 1, "vision_hidden": 32, "text_hidden": 32}
    model, _ = build_untrained(Recipe(position_init="sincos", position_scale=0.5, **small))
    assert torch.equal(_position_table(model)[1:], sincos_positions(24, 32) * 0.5)
    default, _ = build_untrained(Recipe(**small))
    assert not torch.equal(_position_table(default)[1:], sincos_positions(24, 32) * 0.5)  # the bundled recipe
    with pytest.raises(ValueError, match="unknown position_init 'learned'"):
        build_untrained(Recipe(position_init="learned", **small))
