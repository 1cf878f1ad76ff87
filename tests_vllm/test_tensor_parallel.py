"""Two tensor-parallel ranks on CPU: the vision encoder's heads are split, the score terms are all-reduced,
and both ranks keep the Hugging Face path's patches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
from vllm_support import image_embeddings, make_llm, shutdown

from conftest import KEEP, HuggingFaceReference
from flowcut.integrations.vllm.llava import last_kept_indices


@pytest.fixture(scope="module")
def llm(checkpoint: Path) -> Iterator[object]:
    # vLLM's CPU backend binds one OpenMP thread group per rank; "0|1" puts the two ranks on cores 0 and 1
    # (its automatic binding asks for one NUMA node per rank).
    previous = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        engine = make_llm(checkpoint, KEEP, tensor_parallel_size=2)
    finally:
        if previous is None:
            del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = previous
    yield engine
    shutdown(engine)


def test_both_ranks_keep_the_hf_indices(llm: object, hf_reference: HuggingFaceReference) -> None:
    from vllm import SamplingParams

    prompt = "USER: " + "<image>\n" * len(hf_reference.images) + "what colour is the square ? ASSISTANT:"
    request = {"prompt": prompt, "multi_modal_data": {"image": hf_reference.images}}
    output = llm.generate(request, SamplingParams(max_tokens=1, temperature=0.0))[0]
    text_tokens = len(llm.get_tokenizer().encode(prompt, add_special_tokens=True)) - len(hf_reference.images)
    assert len(output.prompt_token_ids) == text_tokens + KEEP * len(hf_reference.images)

    per_rank = llm.apply_model(last_kept_indices)
    assert len(per_rank) == 2
    assert per_rank[0] == per_rank[1] == hf_reference.kept_indices


def test_both_ranks_embed_like_hf(llm: object, hf_reference: HuggingFaceReference) -> None:
    per_rank = llm.apply_model(partial(image_embeddings, pixel_values=hf_reference.pixel_values))
    assert len(per_rank) == 2
    assert llm.apply_model(last_kept_indices) == [hf_reference.kept_indices] * 2
    for rank, embeddings in enumerate(per_rank):
        difference = (embeddings - hf_reference.features).abs().max().item()
        print(f"rank {rank}: max |vLLM - HF| over the projected visual tokens: {difference:.2e}")
        torch.testing.assert_close(embeddings, hf_reference.features, rtol=1e-4, atol=1e-5)
