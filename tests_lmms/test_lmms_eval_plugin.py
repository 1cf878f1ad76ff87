"""lmms-eval itself with the FlowCut models: registration, pruning, scores equal to flowcut eval, log-likelihood.

Needs the ``lmms`` extra (``scripts/ci_lmms.sh`` builds that environment). On CPU-only machines the
registry's torchvision needs the test-only workaround of docs/lmms_eval.md on ``PYTHONPATH``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.models import get_model
from lmms_eval.models.chat.llava_hf import LlavaHf as LlavaHfChat
from lmms_eval.models.simple.llava_hf import LlavaHf
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL
from lmms_eval.tasks import TaskManager
from transformers import AutoProcessor, LlavaForConditionalGeneration

import flowcut
from flowcut.config import FlowCutConfig
from flowcut.data.shapes import samples
from flowcut.integrations import lmms_eval as integration
from flowcut.reference import bundled_model_path
from flowcut.testing import build_tiny_llava_next
from flowcut.tools.evaluate import first_answers
from flowcut.tools.prompting import prompt_inputs

MODEL = bundled_model_path()
CPU = "device=cpu,device_map=cpu"  # lmms-eval's llava_hf defaults to cuda
COUNT = 24


def create(model: str, arguments: str):
    """A model as lmms-eval's command line creates it (``--model NAME --model_args ARGUMENTS``)."""
    return get_model(model).create_from_arg_string(arguments)


def test_model_names_resolve_to_subclasses_of_lmms_evals_own_wrappers():
    assert get_model("llava_hf_flowcut") is integration.LlavaHfChatFlowCut
    assert issubclass(integration.LlavaHfChatFlowCut, LlavaHfChat)
    assert get_model("llava_hf_flowcut", force_simple=True) is integration.LlavaHfFlowCut
    assert issubclass(integration.LlavaHfFlowCut, LlavaHf)
    assert get_model("qwen2_vl_flowcut") is integration.Qwen2VLFlowCut
    assert issubclass(integration.Qwen2VLFlowCut, Qwen2_VL)
    assert issubclass(get_model("qwen2_5_vl_flowcut"), Qwen2_5_VL)
    assert get_model("qwen2_5_vl_flowcut", force_simple=True) is integration.Qwen2_5_VLFlowCut
    # lmms-eval's own llava_hf is untouched.
    assert get_model("llava_hf") is LlavaHfChat


def test_the_wrapper_prunes_the_model_it_loaded_and_its_processor_writes_keep_placeholders():
    lm = create("llava_hf_flowcut", f"pretrained={MODEL},keep=64,method=flowcut,{CPU}")
    assert lm.flowcut_config == FlowCutConfig(keep=64, method="flowcut")
    assert flowcut.get_handle(lm.model) is lm.flowcut_handle and lm.flowcut_handle.active
    sample = next(samples("test", 1))
    inputs = lm._image_processor(images=[sample.image], text="USER: <image>\nwhat ? ASSISTANT:", return_tensors="pt")
    assert int((inputs["input_ids"] == lm.model.config.image_token_id).sum()) == 64
    stock = create("llava_hf", f"pretrained={MODEL},{CPU}")
    inputs = stock._image_processor(images=[sample.image], text="USER: <image>\nwhat ? ASSISTANT:", return_tensors="pt")
    assert int((inputs["input_ids"] == stock.model.config.image_token_id).sum()) == 576
    assert flowcut.get_handle(stock.model) is None


def test_a_single_process_run_needs_no_device_map_unlike_the_stock_llava_hf_on_transformers_5():
    lm = create("llava_hf_flowcut", f"pretrained={MODEL},keep=64,device=cpu")
    assert lm.device_map == "cpu" and lm.model.device.type == "cpu"
    with pytest.raises(ValueError, match="When passing device_map as a string"):
        create("llava_hf", f"pretrained={MODEL},device=cpu")


def test_invalid_flowcut_arguments_fail_with_flowcuts_message():
    with pytest.raises(ValueError, match="keep must be at least 1 visual token per image, got 0"):
        create("llava_hf_flowcut", f"pretrained={MODEL},keep=0,{CPU}")
    with pytest.raises(ValueError, match="unknown method"):
        create("llava_hf_flowcut", f"pretrained={MODEL},method=flowkut,{CPU}")


@pytest.fixture(scope="module")
def task_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("task")
    integration.write_shapes_task(directory, count=COUNT)
    return directory


def flowcut_answers(config: FlowCutConfig | None) -> list[str]:
    """Each question's first greedy token as ``flowcut eval`` computes it (one padded batch)."""
    model = LlavaForConditionalGeneration.from_pretrained(MODEL).eval()
    processor = AutoProcessor.from_pretrained(MODEL)
    questions = list(samples("test", COUNT))
    if config is None:
        return first_answers(model, processor, questions)
    with flowcut.apply(model, processor=copy.deepcopy(processor), config=config) as handle:
        return first_answers(model, handle.processor, questions)


@pytest.mark.parametrize(
    ("model", "arguments", "config"),
    [
        ("llava_hf_flowcut", "keep=64,method=flowcut", FlowCutConfig(keep=64)),
        ("llava_hf_flowcut", "keep=32,method=visionzip", FlowCutConfig(keep=32, method="visionzip")),
        ("llava_hf", "", None),
    ],
)
def test_lmms_eval_answers_every_question_as_flowcut_eval(task_directory, model, arguments, config):
    output = simple_evaluate(
        model=model,
        model_args=",".join(part for part in (f"pretrained={MODEL}", arguments, CPU) if part),
        tasks=[integration.TASK_NAME],
        batch_size=1,
        log_samples=True,
        task_manager=TaskManager(include_path=str(task_directory), include_defaults=False),
    )
    logged = sorted(output["samples"][integration.TASK_NAME], key=lambda sample: sample["doc_id"])
    assert [sample["doc"]["index"] for sample in logged] == list(range(COUNT))
    expected = flowcut_answers(config)
    assert [sample["filtered_resps"][0] for sample in logged] == expected
    answers = [sample.answer for sample in samples("test", COUNT)]
    correct = sum(answer == truth for answer, truth in zip(expected, answers, strict=True))
    assert output["results"][integration.TASK_NAME]["accuracy,none"] == pytest.approx(correct / COUNT, abs=1e-12)


def loglikelihood_request(lm, sample) -> Instance:
    """One log-likelihood request for a shapes question, set up as lmms-eval's evaluator does."""
    doc = {"question": sample.question, "answer": sample.answer, "image_object": sample.image}
    lm.task_dict = {"shapes": {"test": [doc]}}
    arguments = (sample.question, sample.answer, lambda d: [d["image_object"]], 0, "shapes", "test")
    metadata = {"task": "shapes", "doc_id": 0, "repeats": 1}
    return Instance(request_type="loglikelihood", arguments=arguments, idx=0, metadata=metadata)


def test_log_likelihood_is_refused_when_the_language_model_prunes():
    lm = create("llava_hf_flowcut", f"pretrained={MODEL},keep=64,method=fastv,{CPU}")
    request = loglikelihood_request(lm, next(samples("test", 1)))
    with pytest.raises(NotImplementedError, match=r"refused for pruning inside the language model \('fastv' on Llava"):
        lm.loglikelihood([request])


def test_encoder_stage_log_likelihood_is_lmms_evals_own_code_which_fails_on_transformers_5():
    """Documents lmms-eval 0.7.3's llava_hf log-likelihood on transformers 5: it fails before the model runs.

    It renders the prompt through the tokenizer's chat template with string content (the bundled
    model's template takes list content only, so no image token is written). The FlowCut wrapper hands
    the request to that code unchanged, so it fails exactly as the stock wrapper does.
    """
    sample = next(samples("test", 1))
    errors = []
    for model, arguments in (("llava_hf_flowcut", "keep=64,"), ("llava_hf", "")):
        lm = create(model, f"pretrained={MODEL},{arguments}{CPU}")
        with pytest.raises(ValueError, match="Found total 0 <image> tokens and 1 images") as error:
            lm.loglikelihood([loglikelihood_request(lm, sample)])
        errors.append(str(error.value))
    assert errors[0] == errors[1]


def test_transformers_5_refuses_the_context_only_call_of_lmms_evals_llava_hf_log_likelihood():
    """The step after it (context tokenized with the processor and no image) is refused for every checkpoint."""
    processor = AutoProcessor.from_pretrained(MODEL)
    with pytest.raises(ValueError, match="Found 1 <image> tokens in the text but no images were passed"):
        processor(text=["USER: <image>\nwhat ? ASSISTANT:"], return_tensors="pt")


def test_llava_next_through_lmms_evals_llava_hf_answers_as_the_pruned_model_does(task_directory, tmp_path):
    """LLaVA-NeXT (two stages: encoder per crop, then the language model) through the same wrapper."""
    model, processor = build_tiny_llava_next(seed=0, text_layers=4)
    model.save_pretrained(tmp_path / "next")
    processor.save_pretrained(tmp_path / "next")
    count = 6
    output = simple_evaluate(
        model="llava_hf_flowcut",
        model_args=f"pretrained={tmp_path / 'next'},keep=16,method=flowcut,{CPU}",
        tasks=[integration.TASK_NAME],
        batch_size=1,
        limit=count,
        log_samples=True,
        task_manager=TaskManager(include_path=str(task_directory), include_defaults=False),
    )
    logged = sorted(output["samples"][integration.TASK_NAME], key=lambda sample: sample["doc_id"])
    expected = []
    with flowcut.apply(model, processor=processor, keep=16) as handle, torch.inference_mode():
        for sample in samples("test", count):
            inputs = prompt_inputs(processor, sample.image, sample.question, "cpu", torch.float32)
            token = model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1]
            expected.append(processor.tokenizer.decode([int(token)], skip_special_tokens=True).strip())
            assert handle.last_trace.language_positions is not None  # the language-model stage ran
    assert [sample["filtered_resps"][0] for sample in logged] == expected
