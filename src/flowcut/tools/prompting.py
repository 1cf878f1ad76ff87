"""Prompts in the model's own chat format, and model inputs built from them (CLI, eval, bench, viz)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

PLACEHOLDERS = {"image": ("<image>",), "video": ("<video>", "<|video_pad|>")}
"""Per kind of media, the placeholders that mark a question as a complete prompt already."""


def check_placeholders(question: str, count: int, kind: str) -> None:
    """Refuse a question whose placeholders do not match its ``count`` images (videos); none is fine."""
    found = sum(question.count(placeholder) for placeholder in PLACEHOLDERS[kind])
    if found and found != count:
        raise ValueError(
            f"the prompt holds {found} {kind} placeholders ({PLACEHOLDERS[kind][0]}) for {count} {kind}(s): "
            f"write one per {kind}, or none and the prompt gets one"
        )


def build_prompt(processor: Any, question: str, kind: str = "image") -> str:
    """The model's chat format around one image (or video, ``kind="video"``) and the question.

    Without a chat template this is a LLaVA-1.5 prompt. A question that already holds the kind's
    placeholder (``<image>``; ``<video>`` or Qwen's ``<|video_pad|>``) is taken as a complete prompt.
    """
    if any(placeholder in question for placeholder in PLACEHOLDERS[kind]):
        return question
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <{kind}>\n{question} ASSISTANT:"


def prompt_inputs(
    processor: Any, images: Any, questions: str | Sequence[str], device: torch.device | str, dtype: torch.dtype
) -> Any:
    """Processor inputs for one question per image (padded as a batch), on ``device``, pixels in ``dtype``."""
    if isinstance(questions, str):
        check_placeholders(questions, len(images) if isinstance(images, Sequence) else 1, "image")
    else:
        for question in questions:
            check_placeholders(question, 1, "image")
    texts = (
        build_prompt(processor, questions)
        if isinstance(questions, str)
        else [build_prompt(processor, question) for question in questions]
    )
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def video_prompt_inputs(
    processor: Any, frames: Any, question: str, device: torch.device | str, dtype: torch.dtype
) -> Any:
    """Processor inputs for one question about one video (``frames``: ``(F, H, W, 3)``), pixels in ``dtype``."""
    check_placeholders(question, 1, "video")
    inputs = processor(videos=[frames], text=build_prompt(processor, question, "video"), return_tensors="pt").to(device)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
    return inputs
