"""lmms-eval integration: FlowCut on lmms-eval's own Hugging Face wrappers, and an offline shapes-VQA task.

Models (registered through lmms-eval's ``lmms_eval.models`` entry point, see :func:`model_manifests`):

- ``llava_hf_flowcut``: lmms-eval's ``llava_hf`` (LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision ``-hf`` checkpoints),
- ``qwen2_vl_flowcut``: lmms-eval's ``qwen2_vl``,
- ``qwen2_5_vl_flowcut``: lmms-eval's ``qwen2_5_vl``.

Each is a subclass of the lmms-eval wrapper: the wrapper loads the model and processor exactly as it
always does, then :func:`flowcut.apply` prunes that model instance and makes that processor emit the
pruned number of image placeholders. ``--model_args`` takes the wrapper's own arguments plus any
:class:`~flowcut.config.FlowCutConfig` field (``keep``, ``method``, ``schedule``, ...), e.g.
``pretrained=llava-hf/llava-1.5-7b-hf,keep=64,method=flowcut``.

The classes subclass lmms-eval's, so they are built on first access (module ``__getattr__``): this
module imports without lmms-eval, which the task helpers and the command line below do not need.

Offline task (``python -m flowcut.integrations.lmms_eval write-task DIR``): the project's procedural
shapes-VQA questions as a local lmms-eval task for ``--include_path DIR``, asked and judged as
``flowcut eval`` does (same chat prompt, same images, the first greedy token against the one-word
answer). ``compare`` checks that an lmms-eval run scored exactly what ``flowcut eval`` scored.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from PIL import Image

from flowcut.api import apply
from flowcut.config import FlowCutConfig

MODULE = "flowcut.integrations.lmms_eval"
"""This module's import path (``__name__`` is ``__main__`` when it runs as a command)."""

TASK_NAME = "flowcut_shapes_vqa"
"""Name of the offline task :func:`write_shapes_task` writes."""

METRIC = "accuracy"
"""The task's one metric: share of questions whose first generated token is the answer."""


@dataclass(frozen=True)
class WrappedModel:
    """One lmms-eval wrapper class and the attribute where it keeps the model's processor."""

    module: str
    class_name: str
    processor_attribute: str
    fills_device_map: bool = False
    """Whether the wrapper needs :func:`single_process_device_map` (lmms-eval's llava_hf)."""


WRAPPED_MODELS: dict[str, WrappedModel] = {
    "LlavaHfFlowCut": WrappedModel("lmms_eval.models.simple.llava_hf", "LlavaHf", "_image_processor", True),
    "LlavaHfChatFlowCut": WrappedModel("lmms_eval.models.chat.llava_hf", "LlavaHf", "_image_processor", True),
    "Qwen2VLFlowCut": WrappedModel("lmms_eval.models.simple.qwen2_vl", "Qwen2_VL", "processor"),
    "Qwen2_5_VLFlowCut": WrappedModel("lmms_eval.models.simple.qwen2_5_vl", "Qwen2_5_VL", "processor"),
    "Qwen2_5_VLChatFlowCut": WrappedModel("lmms_eval.models.chat.qwen2_5_vl", "Qwen2_5_VL", "processor"),
}
"""Our class name → the lmms-eval class it subclasses."""

MODEL_IDS: dict[str, tuple[str | None, str | None]] = {
    "llava_hf_flowcut": ("LlavaHfFlowCut", "LlavaHfChatFlowCut"),
    "qwen2_vl_flowcut": ("Qwen2VLFlowCut", None),
    "qwen2_5_vl_flowcut": ("Qwen2_5_VLFlowCut", "Qwen2_5_VLChatFlowCut"),
}
"""``--model`` name → (simple class, chat class), as lmms-eval registers the wrapped models themselves.

lmms-eval picks the chat class where there is one and the simple class with ``--force_simple``."""

FLOWCUT_ARGUMENTS = tuple(field.name for field in fields(FlowCutConfig))
"""``--model_args`` keys that configure FlowCut; every other key goes to the lmms-eval wrapper."""

LANGUAGE_STAGE_LOGLIKELIHOOD = (
    "log-likelihood requests are refused for pruning inside the language model ({method!r} on {model}): "
    "its decoder layer picks the visual tokens with the last token of the pass, which in a log-likelihood "
    "pass is the last token of the candidate answer, so every candidate would be scored against different "
    "visual tokens than generation sees. Use generation tasks, or a method that prunes in the vision "
    "encoder only (every family: visionzip, divprune, pool, random; LLaVA-1.5 and Video-LLaVA: flowcut too)."
)


def split_model_args(model_args: dict[str, Any]) -> tuple[FlowCutConfig, dict[str, Any]]:
    """The FlowCut configuration in lmms-eval ``--model_args``, and the arguments left for the wrapper.

    lmms-eval has already turned ``keep=64`` into an int and ``keep=0.111`` into a float; unset
    fields keep :class:`FlowCutConfig`'s defaults (keep 64, FlowCut). Invalid values raise its errors.
    """
    settings = {name: value for name, value in model_args.items() if name in FLOWCUT_ARGUMENTS}
    rest = {name: value for name, value in model_args.items() if name not in FLOWCUT_ARGUMENTS}
    return FlowCutConfig(**settings), rest


def single_process_device_map(wrapper_args: dict[str, Any]) -> dict[str, Any]:
    """lmms-eval's llava_hf arguments with ``device_map`` defaulting to ``device`` in a single-process run.

    lmms-eval 0.7.3's llava_hf hands its default ``device_map=""`` to ``from_pretrained`` when one
    process runs, which transformers 5 refuses. Data-parallel runs (``accelerate launch``, which sets
    ``WORLD_SIZE``) keep ``""``: from it the wrapper places each process's copy on ``cuda:{rank}``.
    """
    if wrapper_args.get("device_map", "") != "" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return wrapper_args
    return {**wrapper_args, "device_map": str(wrapper_args.get("device", "cuda"))}


def prunes_in_language_model(model: Any, config: FlowCutConfig) -> bool:
    """Whether ``config`` on ``model`` drops visual tokens inside the language model (after a decoder layer).

    The family decides (FastV everywhere; FlowCut's second stage on LLaVA-NeXT, OneVision and Qwen-VL);
    the configuration is applied and removed at once to ask it.
    """
    with apply(model, config=config) as handle:
        return handle.prunes_in_language_model


class FlowCutWrapperMixin:
    """FlowCut on an lmms-eval wrapper: put before the wrapper class in the bases (see :data:`WRAPPED_MODELS`)."""

    flowcut_processor_attribute: str = ""
    """Attribute where the wrapper keeps the processor it builds prompts with."""
    flowcut_fills_device_map: bool = False

    def __init__(self, **model_args: Any) -> None:
        config, wrapper_args = split_model_args(model_args)
        if self.flowcut_fills_device_map:
            wrapper_args = single_process_device_map(wrapper_args)
        super().__init__(**wrapper_args)  # the lmms-eval wrapper loads model and processor as always
        self.flowcut_config = config
        processor = getattr(self, self.flowcut_processor_attribute)
        # self.model is the unwrapped instance on this rank (data parallel: one pruned copy per process).
        self.flowcut_handle = apply(self.model, processor=processor, config=config)

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """lmms-eval's own log-likelihood where pruning happens in the vision encoder; refused otherwise.

        Encoder-stage pruning does not look at the text, so a prompt + continuation pass sees the same
        visual tokens as generation. Language-model pruning would pick them from the continuation's
        last token (see :data:`LANGUAGE_STAGE_LOGLIKELIHOOD`).
        """
        if self.flowcut_handle.prunes_in_language_model:
            raise NotImplementedError(
                LANGUAGE_STAGE_LOGLIKELIHOOD.format(method=self.flowcut_config.method, model=type(self.model).__name__)
            )
        return super().loglikelihood(requests)


def _build_wrapper(name: str) -> type:
    """Our subclass of one lmms-eval wrapper (imports lmms-eval)."""
    wrapped = WRAPPED_MODELS[name]
    base = getattr(importlib.import_module(wrapped.module), wrapped.class_name)
    namespace = {
        "__module__": MODULE,
        "__qualname__": name,
        "__doc__": f"lmms-eval's {wrapped.module}.{wrapped.class_name} with FlowCut applied to the model it loads.",
        "flowcut_processor_attribute": wrapped.processor_attribute,
        "flowcut_fills_device_map": wrapped.fills_device_map,
    }
    return type(name, (FlowCutWrapperMixin, base), namespace)


_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """The wrapper classes, built on first access so that importing this module needs no lmms-eval."""
    if name not in WRAPPED_MODELS:
        raise AttributeError(f"module {MODULE!r} has no attribute {name!r}")
    if name not in _BUILT:
        _BUILT[name] = _build_wrapper(name)
    return _BUILT[name]


def model_manifests() -> list[Any]:
    """The ``lmms_eval.models`` entry point: one ``ModelManifest`` per ``--model`` name of :data:`MODEL_IDS`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    def path(class_name: str | None) -> str | None:
        return None if class_name is None else f"{MODULE}.{class_name}"

    return [
        ModelManifest(model_id=model_id, simple_class_path=path(simple), chat_class_path=path(chat))
        for model_id, (simple, chat) in MODEL_IDS.items()
    ]


# -- the offline task --------------------------------------------------------------------------


def shapes_doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The question's image (written losslessly by :func:`write_shapes_task`, so the pixels are the sample's)."""
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def shapes_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The bare question: the wrapper puts the image before it in the model's chat template, as ``flowcut eval``."""
    return doc["question"]


def shapes_process_results(doc: dict[str, Any], results: Sequence[Any]) -> dict[str, float]:
    """1.0 when the generated text (one greedy token) is the answer word, as ``flowcut eval`` judges."""
    generated = results[0]
    text = getattr(generated, "text", generated)  # a str, or lmms-eval's GenerationResult
    return {METRIC: float(str(text).strip() == doc["answer"])}


def task_yaml(task: str, data_file: Path) -> str:
    """The lmms-eval task definition: local JSON lines, one greedy token, this module's functions."""
    functions = f"!function {MODULE}"
    return f"""# Written by `python -m {MODULE} write-task`: shapes VQA as `flowcut eval` asks it.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data_file))}
test_split: test
output_type: generate_until
doc_to_visual: {functions}.shapes_doc_to_visual
doc_to_text: {functions}.shapes_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 1
  temperature: 0
  do_sample: false
  num_beams: 1
process_results: {functions}.shapes_process_results
metric_list:
  - metric: {METRIC}
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def write_shapes_task(directory: str | Path, split: str = "test", count: int = 200, start: int = 0) -> Path:
    """Write questions ``start … start+count-1`` of a shapes-VQA split as an lmms-eval task into ``directory``.

    ``directory`` gets ``images/`` (PNG, lossless), ``{TASK_NAME}.jsonl`` and ``{TASK_NAME}.yaml``
    (absolute paths, so run lmms-eval from anywhere with ``--include_path directory``). Returns the YAML path.
    """
    from flowcut.data.shapes import samples

    if count < 1 or start < 0:
        raise ValueError(f"count must be at least 1 and start at least 0, got count={count}, start={start}")
    root = Path(directory).resolve()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, sample in enumerate(samples(split, count, start), start=start):
        image_path = images / f"{split}_{index:06d}.png"
        sample.image.save(image_path)
        record = {
            "index": index,
            "question": sample.question,
            "answer": sample.answer,
            "kind": sample.kind,
            "image": str(image_path),
        }
        lines.append(json.dumps(record))
    data_file = root / f"{TASK_NAME}.jsonl"
    data_file.write_text("\n".join(lines) + "\n")
    yaml_path = root / f"{TASK_NAME}.yaml"
    yaml_path.write_text(task_yaml(TASK_NAME, data_file))
    return yaml_path


# -- comparing with `flowcut eval` --------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """Correct answers out of a number of questions."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        """Share of correct answers."""
        return self.correct / self.total


def read_lmms_score(output_path: str | Path, task: str = TASK_NAME) -> Score:
    """The task's score in the newest ``*_results.json`` under an lmms-eval ``--output_path``."""
    found = sorted(Path(output_path).rglob("*results.json"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no lmms-eval results (*results.json) under {output_path}")
    data = json.loads(found[-1].read_text())
    if task not in data.get("results", {}):
        raise KeyError(f"{found[-1]} has no results for task {task!r}")
    accuracy = data["results"][task][f"{METRIC},none"]
    total = int(data["n-samples"][task]["effective"])
    correct = round(accuracy * total)
    if abs(correct - accuracy * total) > 1e-6:
        raise ValueError(f"{task} accuracy {accuracy} is not a whole number of {total} questions")
    return Score(correct, total)


def read_flowcut_eval_score(eval_json: str | Path, method: str | None, keep: int | None = None) -> Score:
    """One row of ``flowcut eval``'s ``eval.json``: ``method=None`` for the unpruned model."""
    data = json.loads(Path(eval_json).read_text())
    for row in data["results"]:
        if row["method"] == method and (method is None or row["keep"] == keep):
            return Score(int(row["correct"]), int(row["total"]))
    raise KeyError(f"{eval_json} has no row for method={method!r}, keep={keep!r}")


def compare_scores(lmms: Score, flowcut_eval: Score) -> str:
    """A one-line verdict; raises ``ValueError`` unless both counted the same correct answers of the same total."""
    line = (
        f"lmms-eval {lmms.correct}/{lmms.total} ({100 * lmms.accuracy:.2f} %), "
        f"flowcut eval {flowcut_eval.correct}/{flowcut_eval.total} ({100 * flowcut_eval.accuracy:.2f} %)"
    )
    if lmms != flowcut_eval:
        raise ValueError(f"scores differ: {line}")
    return f"scores match: {line}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flowcut.integrations.lmms_eval write-task|compare …``."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write-task", help="write the offline shapes-VQA task for --include_path")
    write.add_argument("directory", type=Path)
    write.add_argument("--split", default="test", choices=("test", "validation", "train"))
    write.add_argument("--count", type=int, default=200)
    write.add_argument("--start", type=int, default=0)
    compare = commands.add_parser("compare", help="check an lmms-eval score against flowcut eval's eval.json")
    compare.add_argument("--lmms-output", type=Path, required=True, help="the --output_path of the lmms-eval run")
    compare.add_argument("--eval-json", type=Path, required=True, help="eval.json written by flowcut eval")
    compare.add_argument("--method", default="flowcut", help="flowcut eval method name, or 'unpruned'")
    compare.add_argument("--keep", type=int, default=64)
    compare.add_argument("--task", default=TASK_NAME)
    args = parser.parse_args(argv)
    if args.command == "write-task":
        print(write_shapes_task(args.directory, args.split, args.count, args.start))
        return 0
    method = None if args.method == "unpruned" else args.method
    try:
        verdict = compare_scores(
            read_lmms_score(args.lmms_output, args.task), read_flowcut_eval_score(args.eval_json, method, args.keep)
        )
    except (KeyError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.method}{'' if method is None else f' keep {args.keep}'}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
