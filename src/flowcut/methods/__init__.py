"""The method registry behind :func:`flowcut.apply`: which visual tokens of each image reach the language model.

A method is one small class in one module of this package, registered with :func:`register`:
it receives an :class:`EncoderCall` (the images, the family's encoder adapter, the feature layer
and the family's projector) and returns an :class:`MethodOutput` with exactly
:meth:`Method.tokens_per_image` projected tokens per image. Methods know nothing about model
families; a family adapter builds the call. Adding a method means adding one module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from flowcut.core.encoder_stage import (
    AttentionRecord,
    AttentionRecorder,
    EncoderStageOutput,
    ImageTrace,
    VisionEncoderAdapter,
)

if TYPE_CHECKING:
    from flowcut.config import FlowCutConfig


@dataclass(frozen=True)
class EncoderCall:
    """One batch of images on its way to the language model: everything a method may use."""

    config: FlowCutConfig
    encoder: VisionEncoderAdapter
    pixel_values: torch.Tensor
    feature_layer: int
    """0-based encoder layer whose output feeds the projector; later layers never run."""
    grid_size: tuple[int, int]
    """Patch grid (rows, columns), row-major patch order, the query token (CLS) excluded."""
    project: Callable[[torch.Tensor], torch.Tensor]
    """The family's projector: ``(B, T, D_vision) -> (B, T, D_text)``."""

    @property
    def num_patches(self) -> int:
        """Patches per image before any pruning."""
        return self.grid_size[0] * self.grid_size[1]


@dataclass(frozen=True)
class UnitCall:
    """One encoder pass of a two-stage family: units of several sizes and budgets, some never to survive.

    A unit is what the family's tower hands on as one token: a patch of a LLaVA-NeXT crop or video
    frame, a 2×2 merge group of Qwen-VL. Rows are crops, frames or images, each with its own budget.
    """

    config: FlowCutConfig
    encoder: VisionEncoderAdapter
    pixel_values: torch.Tensor
    feature_layer: int
    keeps: list[int]
    """Units each row keeps."""
    counts: list[int] | None = None
    """Units of each row where rows differ in size (the encoder pads them); None: every row is full."""
    eligible: list[torch.Tensor | None] | None = None
    """Per row, the units that may survive (None: all); the others are always dropped first."""


@dataclass
class MethodOutput:
    """The projected visual tokens per image, what the encoder produced, and what happened per image."""

    features: torch.Tensor
    """``(B, tokens_per_image, D_text)``: the language model's visual input embeddings."""
    hidden_states: torch.Tensor
    """The encoder-side tokens the features were projected from (``last_hidden_state`` of the call)."""
    images: list[ImageTrace]
    scoring_seconds: float | None = None
    """Time spent choosing the tokens, where the method measured it (FlowCut with ``time_scoring``)."""


class Method:
    """One way of choosing each image's visual tokens; subclasses set the class attributes and :meth:`run`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    """One line for tables and ``--help``: what it keeps, and its source."""
    prunes: ClassVar[bool] = True
    """False only for the unpruned reference (``"none"``): the family runs its stock path."""
    stage: ClassVar[str] = "encoder"
    """``"encoder"``: :meth:`run` chooses the tokens handed to the language model. ``"language"``: every
    token enters the language model and a decoder layer prunes them (``language_layer``, ``language_score``)."""
    language_layer: ClassVar[int] = 1
    """Language-stage methods, and the second stage of two-stage families (LLaVA-NeXT, Qwen2-VL): the decoder
    layer after which visual tokens are pruned."""
    language_score: ClassVar[str] = "attention"
    """The score used there: one of :data:`flowcut.core.language_stage.SCORES`."""

    def tokens_per_image(self, keep: int, num_patches: int) -> int:
        """Visual tokens per image that reach the language model."""
        return min(keep, num_patches) if self.prunes else num_patches

    def run(self, call: EncoderCall) -> MethodOutput:
        """Choose and project the visual tokens of one batch."""
        raise NotImplementedError

    def select_units(self, call: UnitCall) -> EncoderStageOutput:
        """The encoder stage of a two-stage family: each row's kept units at the feature layer, unprojected.

        Only methods that override this run in the encoder stage of LLaVA-NeXT, LLaVA-OneVision and
        Qwen-VL (and keep twice the budget there; ``language_score`` finishes after ``language_layer``).
        """
        raise NotImplementedError(f"method {self.name!r} has no encoder stage for two-stage families")

    @property
    def selects_units(self) -> bool:
        """Whether the method runs in the encoder stage of two-stage families (:meth:`select_units`)."""
        return type(self).select_units is not Method.select_units


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def method_names() -> tuple[str, ...]:
    """Registered method names, FlowCut first."""
    return tuple(sorted(_REGISTRY, key=lambda name: (name != "flowcut", name)))


def get_method(name: str) -> Method:
    """The registered method ``name``; unknown names are an error that lists the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    return _REGISTRY[name]


def two_stage_methods() -> tuple[str, ...]:
    """Methods a two-stage family offers: the unpruned reference, language-model methods, unit selectors."""
    return tuple(
        name
        for name in method_names()
        if not _REGISTRY[name].prunes or _REGISTRY[name].stage == "language" or _REGISTRY[name].selects_units
    )


def available_method(name: str, available: tuple[str, ...], model_name: str, reason: str = "") -> Method:
    """The method ``name`` where a model family offers only ``available`` ones; a clear error otherwise.

    ``reason`` (a clause) says why the others are not offered.
    """
    if name not in available:
        get_method(name)  # an unknown name is its own error
        because = f" ({reason})" if reason else ""
        raise ValueError(
            f"method {name!r} is not available for {model_name}{because}; available: {', '.join(available)}"
        )
    return get_method(name)


TWO_STAGE_REASON = (
    "this family's encoder stage prunes every crop, frame or merge group to its own budget, "
    "and the method has no such encoder stage yet"
)
"""Why a two-stage family does not offer a method (:func:`available_method`'s ``reason``)."""


# -- helpers shared by methods that read the unpruned feature layer --------------------------------


def run_to_feature_layer(call: EncoderCall, record_last: bool = False) -> tuple[torch.Tensor, AttentionRecord | None]:
    """The unpruned feature-layer output ``(B, 1 + N, D)``, and that layer's attention inputs if asked."""
    hidden_states = call.encoder.embed(call.pixel_values)
    recorder = AttentionRecorder() if record_last else None
    for index in range(call.feature_layer + 1):
        last = index == call.feature_layer
        hidden_states = call.encoder.run_layer(index, hidden_states, None, recorder if last else None)
    return hidden_states, recorder.take() if recorder is not None else None


def unpruned_trace(kept_indices: torch.Tensor, call: EncoderCall) -> ImageTrace:
    """The trace of an image whose encoder ran unpruned and whose tokens were chosen at the feature layer."""
    layers, num_patches = call.feature_layer + 1, call.num_patches
    kept = kept_indices.cpu()
    return ImageTrace(kept, [num_patches] * layers, [call.feature_layer], [None] * layers, kept_after_prune=[kept])


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_discover()

__all__ = [
    "TWO_STAGE_REASON",
    "EncoderCall",
    "Method",
    "MethodOutput",
    "UnitCall",
    "get_method",
    "method_names",
    "register",
    "run_to_feature_layer",
    "two_stage_methods",
    "unpruned_trace",
]
