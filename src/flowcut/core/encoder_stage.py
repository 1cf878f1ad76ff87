"""FlowCut's vision-encoder stage (SPEC §2): progressive pruning inside a ViT.

This is the one implementation of the encoder stage. A model family supplies a
:class:`VisionEncoderAdapter` (how to embed, how to run layer ``i``, how to read the three
criteria from the attention tensors it recorded); the loop, the schedule, the cumulative scores
and the token bookkeeping live here.

Each image follows its own schedule. When images in a batch have different live counts, they are
packed to the longest one and the padding slots are masked out of attention and of every score,
so an image keeps the same tokens alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from flowcut.core.scoring import (
    CriteriaScores,
    entropy_ratio,
    is_prune_layer,
    layer_score,
    prune_count,
    select_kept,
    uniform_prune_count,
    update_cumulative,
)


@dataclass(frozen=True)
class EncoderStageSettings:
    """What the encoder stage needs to know: the budget and where the features are taken."""

    keep: int
    feature_layer: int
    """Index (0-based) of the encoder layer whose output feeds the projector; later layers never run."""
    prune_interval: int = 2
    ema_weight: float = 0.5
    record_scores: bool = False
    one_shot: bool = False
    """Ablation: score only the last layer before the features and prune to ``keep`` there, by that layer alone."""
    uniform_counts: bool = False
    """Ablation: equal prune steps instead of SPEC §2's entropy-adaptive counts."""
    relation_only: bool = False
    """Ablation: score patches by CLS attention alone (multi-criteria off)."""

    @property
    def last_prune_layer(self) -> int:
        """F in SPEC §2: the last layer that runs before the feature layer."""
        return self.feature_layer - 1


@dataclass
class AttentionRecord:
    """The attention inputs of one layer, as the layer's own attention saw them (``(B,H,K,d)``)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float


class AttentionRecorder:
    """Collects the attention inputs of the layer that is running; filled by the adapter's attention hook."""

    def __init__(self) -> None:
        self.record: AttentionRecord | None = None

    def capture(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> None:
        """Keep references to the layer's projections (no copy, no extra compute)."""
        self.record = AttentionRecord(query, key, value, scaling)

    def take(self) -> AttentionRecord:
        """Return the captured record and forget it."""
        if self.record is None:
            raise RuntimeError("the layer ran without passing through FlowCut's recording attention")
        record, self.record = self.record, None
        return record


class VisionEncoderAdapter(Protocol):
    """What a model family provides to the encoder stage."""

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token embeddings entering layer 0, ``(B, 1 + N, D)`` with the query token (CLS) at slot 0."""
        ...

    def run_layer(
        self,
        index: int,
        hidden_states: torch.Tensor,
        alive: torch.Tensor | None,
        recorder: AttentionRecorder | None,
    ) -> torch.Tensor:
        """Run encoder layer ``index``; ``alive`` (B, K) masks padding slots; fill ``recorder`` if given."""
        ...

    def criteria(self, record: AttentionRecord, alive: torch.Tensor | None) -> CriteriaScores:
        """The per-patch criteria (CLS excluded) from one layer's attention record."""
        ...


@dataclass
class ImageTrace:
    """What the encoder stage did to one image."""

    kept_indices: torch.Tensor
    """Kept patch indices (0-based, row-major over the patch grid, CLS excluded), ascending."""
    tokens_per_layer: list[int]
    """Patch tokens each executed encoder layer processed (layer 0 first)."""
    prune_layers: list[int]
    """Layers after which patches were removed."""
    entropy_ratios: list[float | None]
    """H / log N of the CLS attention over patches per layer (None where the layer was not scored)."""
    scores: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    """With ``record_scores``: per criterion, per layer, an (N,) tensor over the full grid, NaN where pruned."""
    kept_after_prune: list[torch.Tensor] = field(default_factory=list)
    """The patch indices alive after each of ``prune_layers`` (ascending); the last equals ``kept_indices``."""


@dataclass
class EncoderStageOutput:
    """Hidden states of the feature layer (slot 0 is the query token) and the per-image traces."""

    hidden_states: torch.Tensor
    images: list[ImageTrace]

    @property
    def kept_indices(self) -> torch.Tensor:
        """``(B, keep)`` kept patch indices, ascending per image."""
        return torch.stack([image.kept_indices for image in self.images])


_SCORE_NAMES = ("relation", "semantic", "density", "score", "cumulative")


def _slot_mask(counts: list[int], width: int, device: torch.device) -> torch.Tensor:
    """``(B, 1 + width)`` mask of real slots: the query token plus the first ``count`` patch slots."""
    patch_slots = torch.arange(width, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
    query_slot = torch.ones(len(counts), 1, dtype=torch.bool, device=device)
    return torch.cat([query_slot, patch_slots], dim=1)


def _grid_values(values: torch.Tensor, positions: torch.Tensor, count: int, num_patches: int) -> torch.Tensor:
    """Scatter one image's per-slot values back onto the full patch grid (NaN where pruned)."""
    grid = torch.full((num_patches,), float("nan"), dtype=torch.float32)
    grid[positions[:count].cpu()] = values[:count].detach().float().cpu()
    return grid


def run_encoder_stage(
    adapter: VisionEncoderAdapter, pixel_values: torch.Tensor, settings: EncoderStageSettings
) -> EncoderStageOutput:
    """Run the encoder up to the feature layer, pruning patches progressively down to ``settings.keep``."""
    hidden_states = adapter.embed(pixel_values)
    batch_size, slots, _ = hidden_states.shape
    num_patches = slots - 1
    keep = settings.keep
    if not 1 <= keep < num_patches:
        raise ValueError(f"the encoder stage needs 1 <= keep < {num_patches} patches, got keep={keep}")
    if settings.last_prune_layer < 0:
        raise ValueError("the feature layer must have at least one encoder layer before it to prune in")
    device = hidden_states.device

    counts = [num_patches] * batch_size
    positions = torch.arange(num_patches, device=device).expand(batch_size, -1)
    cumulative: torch.Tensor | None = None
    traces = [
        ImageTrace(
            kept_indices=torch.empty(0, dtype=torch.long),
            tokens_per_layer=[],
            prune_layers=[],
            entropy_ratios=[],
            scores={name: [] for name in _SCORE_NAMES} if settings.record_scores else {},
        )
        for _ in range(batch_size)
    ]

    for index in range(settings.feature_layer + 1):
        width = max(counts)
        ragged = min(counts) != width
        alive = _slot_mask(counts, width, device) if ragged else None
        scoring = index <= settings.last_prune_layer and width > keep
        if settings.one_shot:
            scoring = scoring and index == settings.last_prune_layer
        recorder = AttentionRecorder() if scoring else None
        hidden_states = adapter.run_layer(index, hidden_states, alive, recorder)
        for trace, count in zip(traces, counts, strict=True):
            trace.tokens_per_layer.append(count)
        if not scoring:
            for trace in traces:
                trace.entropy_ratios.append(None)
                for name in trace.scores:
                    trace.scores[name].append(None)
            continue

        patch_alive = alive[:, 1:] if alive is not None else None
        criteria = adapter.criteria(recorder.take(), alive)
        score = layer_score(criteria, patch_alive, settings.relation_only)
        cumulative = update_cumulative(cumulative, score, settings.ema_weight)
        ratios = entropy_ratio(criteria.relation, patch_alive)
        for b, trace in enumerate(traces):
            # An image already at the budget is no longer scored, exactly as when it runs alone.
            if counts[b] <= keep:
                trace.entropy_ratios.append(None)
                for name in trace.scores:
                    trace.scores[name].append(None)
                continue
            trace.entropy_ratios.append(float(ratios[b]))
            if settings.record_scores:
                per_slot = {
                    "relation": criteria.relation[b],
                    "semantic": criteria.semantic[b],
                    "density": criteria.density[b],
                    "score": score[b],
                    "cumulative": cumulative[b],
                }
                for name, values in per_slot.items():
                    trace.scores[name].append(_grid_values(values, positions[b], counts[b], num_patches))

        remaining = settings.last_prune_layer - index
        if not is_prune_layer(remaining, settings.prune_interval):
            continue
        if settings.uniform_counts:
            removed = [uniform_prune_count(count, keep, remaining, settings.prune_interval) for count in counts]
        else:
            removed = [prune_count(count, keep, remaining, ratios[b]) for b, count in enumerate(counts)]
        new_counts = [count - gone for count, gone in zip(counts, removed, strict=True)]
        if new_counts == counts:
            continue
        kept_slots = [
            select_kept(cumulative[b, :count], new)
            for b, (count, new) in enumerate(zip(counts, new_counts, strict=True))
        ]
        hidden_states, positions, cumulative = _compact(hidden_states, positions, cumulative, kept_slots)
        for b, (trace, count, new) in enumerate(zip(traces, counts, new_counts, strict=True)):
            if new != count:
                trace.prune_layers.append(index)
                trace.kept_after_prune.append(positions[b, :new])  # ascending, like every positions row
        counts = new_counts

    for b, trace in enumerate(traces):
        trace.kept_indices = positions[b, : counts[b]].cpu()
        trace.kept_after_prune = [kept.cpu() for kept in trace.kept_after_prune]
    return EncoderStageOutput(hidden_states=hidden_states, images=traces)


def _compact(
    hidden_states: torch.Tensor,
    positions: torch.Tensor,
    cumulative: torch.Tensor,
    kept_slots: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the given patch slots of every image (CLS stays at slot 0), packed to the longest image."""
    batch_size, _, dim = hidden_states.shape
    width = max(len(slots) for slots in kept_slots)
    new_hidden = hidden_states.new_zeros(batch_size, 1 + width, dim)
    new_positions = positions.new_full((batch_size, width), -1)
    new_cumulative = cumulative.new_zeros(batch_size, width)
    new_hidden[:, 0] = hidden_states[:, 0]
    for b, slots in enumerate(kept_slots):
        count = len(slots)
        new_hidden[b, 1 : 1 + count] = hidden_states[b, 1 + slots]
        new_positions[b, :count] = positions[b, slots]
        new_cumulative[b, :count] = cumulative[b, slots]
    return new_hidden, new_positions, new_cumulative
