"""The bundled reference model: loadable by plain transformers, the CLI's default, and CI's accuracy guard.

The guard answers a fixed slice of the test split (256 questions) unpruned and pruned to 64 of 576
tokens. Its thresholds are the numbers measured when the model was bundled minus a margin of about
3 points. Accuracy differences between methods are a few points on 256 questions, so the
object-patch recall of the kept tokens, not accuracy alone, is what most surely catches a change
that breaks token selection.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoProcessor, LlavaForConditionalGeneration
from typer.testing import CliRunner

from flowcut.data.shapes import samples
from flowcut.reference import bundled_model_path
from flowcut.tools.cli import app
from flowcut.tools.evaluate import evaluate, settings_for

EXAMPLE_IMAGE = Path(__file__).parents[1] / "examples" / "shapes.png"
GUARD_QUESTIONS = 256
# Measured on the bundled model, test questions 0–255: accuracy unpruned 65.2 %, at keep 64 FlowCut
# 61.3 %, one-shot 62.5 %, VisionZip 64.8 %, random 55.5 %; object-patch recall FlowCut 70.3 %,
# one-shot 62.3 %, random 10.5 %.
MINIMUM_ACCURACY = {"unpruned": 0.62, "flowcut": 0.58, "one-shot": 0.59, "visionzip": 0.61, "random": 0.52}
MINIMUM_RECALL = {"flowcut": 0.67, "one-shot": 0.59}
MAXIMUM_RANDOM_RECALL = 0.14


@pytest.fixture(scope="module")
def bundled():
    path = bundled_model_path()
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def test_bundled_model_is_a_small_standard_llava(bundled):
    model, processor = bundled
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (336, 14)  # LLaVA-1.5's 24×24 grid
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    weights = sum(path.stat().st_size for path in bundled_model_path().glob("*.safetensors"))
    assert weights <= 25 * 2**20
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


@pytest.mark.slow
def test_accuracy_guard(bundled):
    model, processor = bundled
    settings = settings_for(["flowcut", "one-shot", "visionzip", "random"], [64])
    results = evaluate(model, processor, list(samples("test", GUARD_QUESTIONS)), settings, batch_size=32)
    by_method = {result.method or "unpruned": result for result in results}
    for method, minimum in MINIMUM_ACCURACY.items():
        accuracy = by_method[method].accuracy
        assert accuracy >= minimum, f"{method}: accuracy {accuracy:.3f} fell below {minimum}"
    for method, minimum in MINIMUM_RECALL.items():
        recall = by_method[method].object_recall
        assert recall >= minimum, f"{method}: object-patch recall {recall:.3f} fell below {minimum}"
    assert by_method["random"].object_recall <= MAXIMUM_RANDOM_RECALL


def test_cli_answers_with_the_bundled_model_by_default():
    result = CliRunner().invoke(
        app, ["generate", "--image", str(EXAMPLE_IMAGE), "--prompt", "what colour is the square ?", "--keep", "64"]
    )
    assert result.exit_code == 0, result.output
    answer = result.output.splitlines()[0]
    assert answer in {"red", "green", "blue", "yellow", "purple", "orange"}
    assert "tokens kept: 64 of 576 per image (88.9% pruned)" in result.output
