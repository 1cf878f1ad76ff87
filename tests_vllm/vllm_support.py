"""Helpers of the vLLM plugin tests, importable by vLLM's worker processes (this folder is on PYTHONPATH)."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flowcut.integrations.vllm import FLOWCUT_LLAVA_ARCHITECTURE

KV_CACHE_BYTES = 256 * 2**20
"""A small, explicit KV cache: vLLM's CPU backend otherwise reserves a share of the machine's memory."""


def save_hub_checkpoint(source: Path, target: Path) -> Path:
    """Copy a ``save_pretrained`` LLaVA directory into the Hub layout vLLM loads (``vision_tower.vision_model.*``).

    transformers 5.x writes the CLIP tower's weights as ``vision_tower.*``; the llava-hf checkpoints
    on the Hub, and vLLM's weight loader, name them ``vision_tower.vision_model.*``.
    """
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, target / path.name)
    renamed = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
        renamed[name] = tensor
    save_file(renamed, target / "model.safetensors", metadata={"format": "pt"})
    return target


def flowcut_overrides(keep: int | float | None) -> dict[str, Any]:
    """The ``hf_overrides`` that turn FlowCut on (``keep=None`` leaves the budget out)."""
    overrides: dict[str, Any] = {"architectures": [FLOWCUT_LLAVA_ARCHITECTURE]}
    if keep is not None:
        overrides["flowcut_keep"] = keep
    return overrides


def make_llm(checkpoint: Path, keep: int | float | None, tensor_parallel_size: int = 1, max_images: int = 4) -> Any:
    """An offline ``vllm.LLM`` serving the checkpoint with FlowCut, float32, small and eager (CPU tests)."""
    from vllm import LLM

    return LLM(
        str(checkpoint),
        hf_overrides=flowcut_overrides(keep),
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        limit_mm_per_prompt={"image": max_images},
        tensor_parallel_size=tensor_parallel_size,
        seed=0,
    )


def shutdown(llm: Any) -> None:
    """Stop the engine's processes now instead of at garbage collection, so the next test gets the cores."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def image_embeddings(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's multimodal embeddings of preprocessed images (for ``LLM.apply_model``), ``(B, keep, D)``."""
    with torch.inference_mode():
        embeddings = model.embed_multimodal(pixel_values=pixel_values.to(next(model.parameters()).dtype))
    return torch.stack(list(embeddings)).cpu() if not isinstance(embeddings, torch.Tensor) else embeddings.cpu()


def vision_layers_built(model: torch.nn.Module) -> int:
    """How many CLIP encoder layers the served model holds (for ``LLM.apply_model``)."""
    return len(model.vision_tower.vision_model.encoder.layers)
