"""Model families: how FlowCut enters each supported model (a declaration on the runtime, no copy of the algorithm).

Each family covers some ``*ForConditionalGeneration`` classes; :data:`FAMILIES` is tried in order
against a model's class. ``clip`` and ``qwen_vision`` adapt the vision towers the families share.
"""

from flowcut.families.gemma3 import Gemma3Family
from flowcut.families.internvl import InternVLFamily
from flowcut.families.llava import LlavaFamily
from flowcut.families.llava_next import LlavaNextFamily, LlavaOnevisionFamily
from flowcut.families.qwen import QwenFamily
from flowcut.families.qwen3_vl import Qwen3_5Family, Qwen3VLFamily
from flowcut.families.video_llava import VideoLlavaFamily
from flowcut.runtime.family import ModelFamily

FAMILIES = (
    LlavaFamily,
    LlavaNextFamily,
    LlavaOnevisionFamily,
    QwenFamily,
    Qwen3VLFamily,
    Qwen3_5Family,
    VideoLlavaFamily,
    Gemma3Family,
    InternVLFamily,
)
"""Model-family adapters, tried in order against the model's class."""


def family_of(model: object) -> type[ModelFamily] | None:
    """The family covering ``model``'s class, or None."""
    return next((family for family in FAMILIES if isinstance(model, family.model_classes)), None)


__all__ = [
    "FAMILIES",
    "Gemma3Family",
    "InternVLFamily",
    "LlavaFamily",
    "LlavaNextFamily",
    "LlavaOnevisionFamily",
    "Qwen3VLFamily",
    "Qwen3_5Family",
    "QwenFamily",
    "VideoLlavaFamily",
    "family_of",
]
