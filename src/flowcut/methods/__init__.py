"""The method registry behind :func:`flowcut.apply`: which visual tokens of each image reach the language model.

A method is one small class in one module of this package, registered with :func:`register`.
Single-stage families (LLaVA-1.5, Video-LLaVA) hand it an :class:`EncoderCall` (the images, the
family's encoder adapter, the feature layer and the projector) and get a :class:`MethodOutput`
with exactly :meth:`Method.tokens_per_image` projected tokens per image. Two-stage families
(LLaVA-NeXT, LLaVA-OneVision, Qwen-VL) hand it a :class:`UnitCall` (rows of units with their own
budgets) and get each row's kept units (:meth:`Method.select_units`); :func:`stages` says where a
method prunes there. Methods know nothing about model families; a family adapter builds the call.
Adding a method means adding one module here.
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
    slot_mask,
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
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    """The family's projector over unit states: ``(B, N, D_unit) -> (B, N, D_text)`` (methods that score
    the language model's input embeddings, DivPrune, need it)."""
    pixel_rows: list[torch.Tensor] | None = None
    """Each row's own pixels where ``pixel_values`` packs the rows together (Qwen-VL); None: ``pixel_values[b]``."""
    grids: list[tuple[int, int]] | None = None
    """Each row's unit grid (rows, columns), units row-major, where rows differ (Qwen-VL's merged grids);
    None: every row is the encoder's patch grid."""

    @property
    def rows(self) -> int:
        """Rows (crops, frames or images) of the call."""
        return len(self.keeps)

    def row_pixels(self, row: int) -> torch.Tensor:
        """The pixels of one row: what makes a row the same row alone or in any batch."""
        return self.pixel_values[row] if self.pixel_rows is None else self.pixel_rows[row]

    def unit_count(self, row: int) -> int:
        """Units of one row before pruning."""
        return self.counts[row] if self.counts is not None else self.encoder.num_patches

    def unit_grid(self, row: int) -> tuple[int, int]:
        """The unit grid (rows, columns) of one row."""
        return self.grids[row] if self.grids is not None else self.encoder.grid_size

    def candidates(self, row: int) -> torch.Tensor:
        """Ascending indices of the row's units that may survive (its real units, those ``eligible`` allows)."""
        units = torch.arange(self.unit_count(row))
        mask = None if self.eligible is None else self.eligible[row]
        return units if mask is None else units[mask.cpu()[: len(units)]]


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
    settings: ClassVar[frozenset[str]] = frozenset()
    """The :class:`~flowcut.config.FlowCutConfig` settings of its own that the method reads (FlowCut's
    schedule, criteria, ``record_scores``, ``time_scoring``, …); others refuse them."""
    finishes_in_language_model: ClassVar[bool] = False
    """Encoder methods in two-stage families: True where the encoder stage keeps more than ``T`` and a
    decoder layer finishes at ``T`` (FlowCut, SPEC §4); False where the encoder stage keeps ``T`` itself
    (each crop, frame or slice its share, SPEC §8) and no decoder layer prunes."""

    def tokens_per_image(self, keep: int, num_patches: int) -> int:
        """Visual tokens per image that reach the language model."""
        return min(keep, num_patches) if self.prunes else num_patches

    def run(self, call: EncoderCall) -> MethodOutput:
        """Choose and project the visual tokens of one batch."""
        raise NotImplementedError

    def select_units(self, call: UnitCall) -> EncoderStageOutput:
        """The encoder stage of a two-stage family: each row's kept units at the feature layer, unprojected.

        Row ``b`` of the output's ``hidden_states`` holds the query slots, then its ``counts[b]`` kept
        units in ascending unit order (the order of its trace's ``kept_indices``). Only methods that
        override this run in the encoder stage of LLaVA-NeXT, LLaVA-OneVision and Qwen-VL;
        :func:`stages` says whether a decoder layer prunes after them.
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


@dataclass(frozen=True)
class Stages:
    """Where a method prunes in a family with an encoder and a language-model stage (LLaVA-NeXT, Qwen-VL)."""

    encoder: bool
    """The method's :meth:`Method.select_units` chooses each row's units in the vision tower."""
    language: bool
    """A decoder layer (``language_layer``) prunes each image to its budget ``T``."""

    @property
    def encoder_keeps_budget(self) -> bool:
        """The encoder stage alone delivers ``T`` per image (its rows share ``T``, SPEC §8)."""
        return self.encoder and not self.language


def stages(method: Method, mode: str = "auto") -> Stages:
    """The two-stage split of ``method``: the one rule every two-stage family follows.

    FlowCut keeps more than ``T`` in the encoder and finishes after decoder layer 1 (SPEC §4); the
    other encoder methods keep ``T`` in the encoder and leave the language model unpruned, as their
    authors run them; language-model methods (FastV) prune only there; ``none`` nowhere. ``mode="encoder"``
    (:attr:`~flowcut.config.FlowCutConfig.stages`) makes every encoder method keep ``T`` in the encoder.
    """
    if not method.prunes:
        return Stages(encoder=False, language=False)
    if method.stage == "language":
        if mode == "encoder":
            raise ValueError(
                f"method {method.name!r} prunes only inside the language model; stages='encoder' needs a method "
                "that prunes in the vision encoder"
            )
        return Stages(encoder=False, language=True)
    return Stages(encoder=method.selects_units, language=method.finishes_in_language_model and mode != "encoder")


def two_stage_methods() -> tuple[str, ...]:
    """Methods a two-stage family offers: the unpruned reference, language-model methods, unit selectors."""
    offered = []
    for name in method_names():
        split = stages(_REGISTRY[name])
        if not _REGISTRY[name].prunes or split.encoder or split.language:
            offered.append(name)
    return tuple(offered)


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
    "this family's encoder stage prunes every crop, frame or image to its own budget of units, "
    "and the method needs one whole patch grid per image"
)
"""Why a two-stage family does not offer a method (:func:`available_method`'s ``reason``)."""


# -- helpers shared by methods that read the unpruned feature layer --------------------------------


def _run_layers(
    encoder: VisionEncoderAdapter,
    hidden_states: torch.Tensor,
    feature_layer: int,
    alive: torch.Tensor | None,
    recorded: tuple[int, ...],
) -> tuple[torch.Tensor, dict[int, AttentionRecord]]:
    """Layers 0 to ``feature_layer``, unpruned; the attention inputs of the ``recorded`` layers."""
    records = {}
    for index in range(feature_layer + 1):
        recorder = AttentionRecorder() if index in recorded else None
        hidden_states = encoder.run_layer(index, hidden_states, alive, recorder)
        if recorder is not None:
            records[index] = recorder.take()
    return hidden_states, records


def run_to_feature_layer(call: EncoderCall, record_last: bool = False) -> tuple[torch.Tensor, AttentionRecord | None]:
    """The unpruned feature-layer output ``(B, 1 + N, D)``, and that layer's attention inputs if asked."""
    hidden_states, _, records = run_recording(call, (call.feature_layer,) if record_last else ())
    return hidden_states, records.get(call.feature_layer)


def run_recording(
    call: EncoderCall | UnitCall, layers: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, AttentionRecord]]:
    """A call's unpruned feature-layer states, its padding mask (None: every row is full) and the attention
    inputs of ``layers``."""
    hidden_states = call.encoder.embed(call.pixel_values)
    alive = _padding(call, hidden_states) if isinstance(call, UnitCall) else None
    hidden_states, records = _run_layers(call.encoder, hidden_states, call.feature_layer, alive, layers)
    return hidden_states, alive, records


def _padding(call: UnitCall, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """The slot mask of a unit call's padded rows (None: every row is full)."""
    lead = call.encoder.query_slots
    width = hidden_states.shape[1] - lead
    counts = [call.unit_count(row) for row in range(call.rows)]
    return None if min(counts) == width else slot_mask(counts, width, lead, hidden_states.device)


def run_units_to_feature_layer(
    call: UnitCall, record_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, AttentionRecord | None]:
    """A unit call's unpruned feature-layer states ``(B, query_slots + N_max, D)``, its padding mask (None:
    every row is full) and that layer's attention inputs if asked."""
    hidden_states, alive, records = run_recording(call, (call.feature_layer,) if record_last else ())
    return hidden_states, alive, records.get(call.feature_layer)


def kept_units_output(
    call: UnitCall,
    hidden_states: torch.Tensor,
    kept: list[torch.Tensor],
    tokens: list[torch.Tensor] | None = None,
) -> EncoderStageOutput:
    """The encoder-stage output of rows whose units were chosen at the unpruned feature layer.

    ``kept`` holds each row's ascending unit indices; ``tokens`` their states where the method made
    new ones (merged tokens standing at a unit's place), else the feature layer's own.
    """
    lead = call.encoder.query_slots
    width = max(len(indices) for indices in kept)
    output = hidden_states.new_zeros(hidden_states.shape[0], lead + width, hidden_states.shape[-1])
    output[:, :lead] = hidden_states[:, :lead]
    traces = []
    for row, indices in enumerate(kept):
        states = hidden_states[row, lead + indices.to(hidden_states.device)] if tokens is None else tokens[row]
        output[row, lead : lead + len(indices)] = states
        traces.append(_feature_layer_trace(indices, call.unit_count(row), call.feature_layer))
    return EncoderStageOutput(output, traces, counts=[len(indices) for indices in kept])


def _feature_layer_trace(kept_indices: torch.Tensor, units: int, feature_layer: int) -> ImageTrace:
    """The trace of a row whose encoder ran unpruned over ``units`` and chose at the feature layer."""
    layers, kept = feature_layer + 1, kept_indices.cpu()
    return ImageTrace(kept, [units] * layers, [feature_layer], [None] * layers, kept_after_prune=[kept])


def kept_patches_output(call: EncoderCall, hidden_states: torch.Tensor, kept: list[torch.Tensor]) -> MethodOutput:
    """The output of images whose patches were chosen at the unpruned feature layer (``kept``: ascending, per
    image): those patches' states ``(B, keep, D)``, projected."""
    patches = torch.stack(
        [states[1 + indices.to(states.device)] for states, indices in zip(hidden_states, kept, strict=True)]
    )
    return MethodOutput(call.project(patches), patches, [unpruned_trace(indices.cpu(), call) for indices in kept])


def unpruned_trace(kept_indices: torch.Tensor, call: EncoderCall) -> ImageTrace:
    """The trace of an image whose encoder ran unpruned and whose tokens were chosen at the feature layer."""
    return _feature_layer_trace(kept_indices, call.num_patches, call.feature_layer)


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_discover()

__all__ = [
    "TWO_STAGE_REASON",
    "EncoderCall",
    "Method",
    "MethodOutput",
    "Stages",
    "UnitCall",
    "get_method",
    "kept_patches_output",
    "kept_units_output",
    "method_names",
    "register",
    "run_recording",
    "run_to_feature_layer",
    "run_units_to_feature_layer",
    "stages",
    "two_stage_methods",
    "unpruned_trace",
]
