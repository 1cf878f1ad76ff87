"""The plugin in vLLM's offline engine, one rank: the same tokens, features and answers as the Hugging Face path."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
from vllm_support import image_embeddings, make_llm, shutdown, vision_layers_built

from conftest import KEEP, HuggingFaceReference
from flowcut.integrations.vllm.llava import last_kept_indices


@pytest.fixture(scope="module")
def llm(checkpoint: Path) -> Iterator[object]:
    engine = make_llm(checkpoint, KEEP)
    yield engine
    shutdown(engine)


def greedy(max_tokens: int) -> object:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def test_images_of_one_request_keep_the_hf_indices(llm: object, hf_reference: HuggingFaceReference) -> None:
    """Four images in one request are encoded in one batch whose images prune on different schedules."""
    schedules = {tuple(layers) for layers in hf_reference.tokens_per_layer}
    assert len(schedules) == len(hf_reference.images), "the images must prune differently to test ragged batches"
    question = "what colour is the square ?"
    prompt = "USER: " + "<image>\n" * len(hf_reference.images) + f"{question} ASSISTANT:"
    output = llm.generate({"prompt": prompt, "multi_modal_data": {"image": hf_reference.images}}, greedy(1))[0]

    text_tokens = len(llm.get_tokenizer().encode(prompt, add_special_tokens=True)) - len(hf_reference.images)
    assert len(output.prompt_token_ids) == text_tokens + KEEP * len(hf_reference.images)
    assert llm.apply_model(last_kept_indices) == [hf_reference.kept_indices]


def test_answers_and_prompt_lengths_match_hf(llm: object, hf_reference: HuggingFaceReference) -> None:
    requests = [
        {"prompt": prompt, "multi_modal_data": {"image": image}}
        for prompt, image in zip(hf_reference.prompts, hf_reference.images, strict=True)
    ]
    outputs = llm.generate(requests, greedy(4))
    assert [len(output.prompt_token_ids) for output in outputs] == hf_reference.prompt_lengths
    assert all(length < 576 for length in hf_reference.prompt_lengths)  # the stock model would need 576 + text
    assert [output.outputs[0].text.strip() for output in outputs] == hf_reference.answers


def test_embeddings_match_hf(llm: object, hf_reference: HuggingFaceReference) -> None:
    """The multimodal embedding of a batch: exactly ``keep`` rows per image, equal to the HF path's features."""
    (embeddings,) = llm.apply_model(partial(image_embeddings, pixel_values=hf_reference.pixel_values))
    assert embeddings.shape == hf_reference.features.shape == (len(hf_reference.images), KEEP, 128)
    assert llm.apply_model(last_kept_indices) == [hf_reference.kept_indices]
    difference = (embeddings - hf_reference.features).abs().max().item()
    torch.testing.assert_close(embeddings, hf_reference.features, rtol=1e-4, atol=1e-5)
    print(f"max |vLLM - HF| over the projected visual tokens: {difference:.2e}")


def test_layers_after_the_feature_layer_are_not_built(llm: object) -> None:
    # The bundled model's CLIP has 8 layers and takes its features from layer -2 (index 6): 7 are built.
    assert llm.apply_model(vision_layers_built) == [7]
