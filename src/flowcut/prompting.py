"""Prompts in the model's own chat format, shared by the CLI and the evaluation."""

from __future__ import annotations

from typing import Any


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
