"""Prompts in the model's own chat format, and model inputs built from them (CLI, eval, bench, viz)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def build_prompt(processor: Any, question: str) -> str:
    """The model's chat format around one image and the question (a LLaVA-1.5 prompt without a template).

    A question that already holds ``<image>`` is taken as a complete prompt.
    """
    if "<image>" in question:
        return question
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def prompt_inputs(
    processor: Any, images: Any, questions: str | Sequence[str], device: torch.device | str, dtype: torch.dtype
) -> Any:
    """Processor inputs for one question per image (padded as a batch), on ``device``, pixels in ``dtype``."""
    texts = (
        build_prompt(processor, questions)
        if isinstance(questions, str)
        else [build_prompt(processor, question) for question in questions]
    )
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def build_video_prompt(processor: Any, question: str) -> str:
    """The model's chat format around one video and the question (``<video>`` prompts kept as they are)."""
    if "<video>" in question or "<|video_pad|>" in question:
        return question
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <video>\n{question} ASSISTANT:"


def video_prompt_inputs(
    processor: Any, frames: Any, question: str, device: torch.device | str, dtype: torch.dtype
) -> Any:
    """Processor inputs for one question about one video (``frames``: ``(F, H, W, 3)``), pixels in ``dtype``."""
    inputs = processor(videos=[frames], text=build_video_prompt(processor, question), return_tensors="pt").to(device)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
    return inputs
