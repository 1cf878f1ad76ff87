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

import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

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
    time_scoring: bool = False
    """Measure the wall time of the scoring and selection steps (on CUDA this synchronises around them)."""

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
    layout: Any = None
    """Where the adapter placed each image's tokens for this layer (packed adapters such as Qwen-VL's:
    the (row, slot) of every packed unit and each row's count); None: ``(B, H, K, d)`` per image."""


class AttentionRecorder:
    """Collects the attention inputs of the layer that is running; filled by the adapter's attention hook."""

    def __init__(self) -> None:
        self.records: list[AttentionRecord] = []
        self.layout: Any = None
        """Set by an adapter that packs the images' tokens for the layer; every record taken carries it."""

    @property
    def record(self) -> AttentionRecord | None:
        """The last capture, or None before the layer's attention ran."""
        return self.records[-1] if self.records else None

    def capture(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> None:
        """Keep references to the layer's projections (no copy, no extra compute)."""
        self.records.append(AttentionRecord(query, key, value, scaling))

    def take(self) -> AttentionRecord:
        """Return what the layer's attention saw and forget it.

        A layer whose attention runs in several calls (packed sequences attended chunk by chunk, as
        Qwen2-VL's vision blocks do without FlashAttention) is captured once per call; the captures
        are joined along the token axis, which is the packed sequence the layer was given.
        """
        if not self.records:
            raise RuntimeError("the layer ran without passing through FlowCut's recording attention")
        records, self.records = self.records, []
        if len(records) == 1:
            return replace(records[0], layout=self.layout)
        query, key, value = (
            torch.cat([getattr(record, name) for record in records], dim=2) for name in ("query", "key", "value")
        )
        return AttentionRecord(query, key, value, records[0].scaling, self.layout)


class VisionEncoderAdapter(Protocol):
    """What a model family provides to the encoder stage.

    The stage works on *units*: the patch tokens of a CLIP ViT, or the 2x2 merge groups of a Qwen
    vision tower (pruned whole so that the merger still fuses real neighbours). ``query_slots`` is 1
    when a CLS token sits at slot 0 and scores the units, 0 when the scoring query is computed from
    the units themselves (the global token of CLS-free encoders).
    """

    query_slots: int

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Embeddings entering layer 0, ``(B, query_slots + N, D)`` (images with fewer units are padded)."""
        ...

    def run_layer(
        self,
        index: int,
        hidden_states: torch.Tensor,
        alive: torch.Tensor | None,
        recorder: AttentionRecorder | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run encoder layer ``index``; fill ``recorder`` if given.

        ``alive`` ``(B, K)`` masks padding slots (None: none); ``positions`` ``(B, K - query_slots)``
        holds each unit slot's original unit index (None: all units, in order).
        """
        ...

    def criteria(self, record: AttentionRecord, alive: torch.Tensor | None) -> CriteriaScores:
        """The per-unit criteria (query slots excluded) from one layer's attention record."""
        ...

    def unit_keys(self, record: AttentionRecord, alive: torch.Tensor | None) -> torch.Tensor:
        """Each unit's key averaged over heads (and over the unit's patches), ``(B, N, d)``; VisionZip merges by it."""
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

    @property
    def units_handed_on(self) -> int:
        """Units the pass hands to the projector: those alive after its last layer."""
        last_layer = len(self.tokens_per_layer) - 1
        if self.prune_layers and self.prune_layers[-1] == last_layer:  # chosen after the last layer ran
            return len(self.kept_after_prune[-1])
        return self.tokens_per_layer[-1]


@dataclass
class EncoderStageOutput:
    """Hidden states of the feature layer (slot 0 is the query token) and the per-image traces."""

    hidden_states: torch.Tensor
    images: list[ImageTrace]
    counts: list[int] = field(default_factory=list)
    """Units each image kept (the first ``counts[b]`` unit slots of row ``b`` are real)."""
    scoring_seconds: float | None = None
    """With ``time_scoring``: seconds spent scoring and selecting (criteria, scores, entropy, top-k)."""


_SCORE_NAMES = ("relation", "semantic", "density", "score", "cumulative")


def slot_mask(counts: list[int], width: int, query_slots: int, device: torch.device) -> torch.Tensor:
    """``(B, query_slots + width)`` mask of real slots: the query slots plus the first ``count`` unit slots."""
    patch_slots = torch.arange(width, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
    query_slot = torch.ones(len(counts), query_slots, dtype=torch.bool, device=device)
    return torch.cat([query_slot, patch_slots], dim=1)


def _grid_values(values: torch.Tensor, positions: torch.Tensor, count: int, num_patches: int) -> torch.Tensor:
    """Scatter one image's per-slot values back onto the full patch grid (NaN where pruned)."""
    grid = torch.full((num_patches,), float("nan"), dtype=torch.float32)
    grid[positions[:count].cpu()] = values[:count].detach().float().cpu()
    return grid


def run_encoder_stage(
    adapter: VisionEncoderAdapter,
    pixel_values: torch.Tensor,
    settings: EncoderStageSettings,
    counts: list[int] | None = None,
    keeps: list[int] | None = None,
    eligible: list[torch.Tensor | None] | None = None,
) -> EncoderStageOutput:
    """Run the encoder up to the feature layer, pruning units progressively down to the budget.

    ``counts`` are the images' unit counts when they differ (images of several resolutions, padded
    by ``adapter.embed``); ``keeps`` the per-image budgets when they differ (default: ``settings.keep``
    for every image). An image at or under its budget is never pruned. ``eligible`` optionally marks,
    per image, the units that may survive (e.g. LLaVA-NeXT crops whose padding is unpadded away
    later): the others take part in attention and in the schedule, but every prune step drops them
    first, so the image ends with exactly its budget of eligible units.
    """
    hidden_states = adapter.embed(pixel_values)
    batch_size, slots, _ = hidden_states.shape
    lead = adapter.query_slots
    if counts is None:
        counts = [slots - lead] * batch_size
        if not 1 <= settings.keep < slots - lead:
            raise ValueError(f"the encoder stage needs 1 <= keep < {slots - lead} patches, got keep={settings.keep}")
    keeps = [settings.keep] * batch_size if keeps is None else list(keeps)
    if len(counts) != batch_size or len(keeps) != batch_size or max(counts) != slots - lead:
        raise ValueError("counts and keeps need one entry per image, and the longest image must fill the slots")
    if min(keeps) < 1:
        raise ValueError(f"every image must keep at least 1 unit, got {keeps}")
    eligible = [None] * batch_size if eligible is None else list(eligible)
    for keep, mask in zip(keeps, eligible, strict=True):
        if mask is not None and int(mask.sum()) < keep:
            raise ValueError(f"an image has {int(mask.sum())} eligible units, fewer than its budget of {keep}")
    if settings.last_prune_layer < 0:
        raise ValueError("the feature layer must have at least one encoder layer before it to prune in")
    device = hidden_states.device

    counts = list(counts)
    unit_counts = list(counts)
    positions = torch.arange(slots - lead, device=device).expand(batch_size, -1)
    positions = positions.masked_fill(positions >= torch.tensor(counts, device=device)[:, None], -1)
    cumulative: torch.Tensor | None = None
    scoring_seconds = 0.0
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
        alive = slot_mask(counts, width, lead, device) if ragged else None
        scoring = index <= settings.last_prune_layer and any(c > k for c, k in zip(counts, keeps, strict=True))
        if settings.one_shot:
            scoring = scoring and index == settings.last_prune_layer
        recorder = AttentionRecorder() if scoring else None
        hidden_states = adapter.run_layer(index, hidden_states, alive, recorder, positions)
        for trace, count in zip(traces, counts, strict=True):
            trace.tokens_per_layer.append(count)
        if not scoring:
            for trace in traces:
                trace.entropy_ratios.append(None)
                for name in trace.scores:
                    trace.scores[name].append(None)
            continue

        scoring_started = _clock(device) if settings.time_scoring else 0.0
        patch_alive = alive[:, lead:] if alive is not None else None
        with torch.no_grad():  # scores only choose tokens: no gradient flows through a selection
            criteria = adapter.criteria(recorder.take(), alive)
            score = layer_score(criteria, patch_alive, settings.relation_only)
            cumulative = update_cumulative(cumulative, score, settings.ema_weight)
            ratios = entropy_ratio(criteria.relation, patch_alive)
        for b, trace in enumerate(traces):
            # An image already at the budget is no longer scored, exactly as when it runs alone.
            if counts[b] <= keeps[b]:
                trace.entropy_ratios.append(None)
                for name in trace.scores:
                    trace.scores[name].append(None)
                continue
            trace.entropy_ratios.append(float(ratios[b]))
            if settings.record_scores:
                per_slot = {
                    "relation": criteria.relation[b],
                    "semantic": criteria.semantic[b] if criteria.semantic is not None else None,
                    "density": criteria.density[b],
                    "score": score[b],
                    "cumulative": cumulative[b],
                }
                for name, values in per_slot.items():
                    grid = None if values is None else _grid_values(values, positions[b], counts[b], unit_counts[b])
                    trace.scores[name].append(grid)

        step = _prune_step(settings, index, counts, keeps, ratios, cumulative, eligible, positions)
        if settings.time_scoring:
            scoring_seconds += _clock(device) - scoring_started
        if step is None:
            continue
        new_counts, kept_slots = step
        hidden_states, positions, cumulative = _compact(hidden_states, positions, cumulative, kept_slots, lead)
        for b, (trace, count, new) in enumerate(zip(traces, counts, new_counts, strict=True)):
            if new != count:
                trace.prune_layers.append(index)
                trace.kept_after_prune.append(positions[b, :new])  # ascending, like every positions row
        counts = new_counts

    for b, trace in enumerate(traces):
        trace.kept_indices = positions[b, : counts[b]].cpu()
        trace.kept_after_prune = [kept.cpu() for kept in trace.kept_after_prune]
    timing = scoring_seconds if settings.time_scoring else None
    return EncoderStageOutput(hidden_states=hidden_states, images=traces, counts=counts, scoring_seconds=timing)


def _prune_step(
    settings: EncoderStageSettings,
    index: int,
    counts: list[int],
    keeps: list[int],
    ratios: torch.Tensor,
    cumulative: torch.Tensor,
    eligible: list[torch.Tensor | None],
    positions: torch.Tensor,
) -> tuple[list[int], list[torch.Tensor]] | None:
    """After layer ``index``: each image's new unit count and the slots it keeps, or None if nothing is pruned."""
    remaining = settings.last_prune_layer - index
    if not is_prune_layer(remaining, settings.prune_interval):
        return None
    if settings.uniform_counts:
        removed = [
            uniform_prune_count(count, keep, remaining, settings.prune_interval)
            for count, keep in zip(counts, keeps, strict=True)
        ]
    else:
        removed = [prune_count(count, keeps[b], remaining, ratios[b]) for b, count in enumerate(counts)]
    new_counts = [count - gone for count, gone in zip(counts, removed, strict=True)]
    if new_counts == counts:
        return None
    kept_slots = [
        select_kept(_eligible_scores(cumulative[b, :count], eligible[b], positions[b, :count]), new)
        for b, (count, new) in enumerate(zip(counts, new_counts, strict=True))
    ]
    return new_counts, kept_slots


def _clock(device: torch.device) -> float:
    """Seconds on a monotonic clock, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _eligible_scores(cumulative: torch.Tensor, eligible: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """One image's cumulative scores with its ineligible units ranked last."""
    if eligible is None:
        return cumulative
    allowed = eligible.to(positions.device)[positions]
    return cumulative.masked_fill(~allowed, float("-inf"))


def _compact(
    hidden_states: torch.Tensor,
    positions: torch.Tensor,
    cumulative: torch.Tensor,
    kept_slots: list[torch.Tensor],
    lead: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the given unit slots of every image (query slots stay in front), packed to the longest image."""
    batch_size, _, dim = hidden_states.shape
    width = max(len(slots) for slots in kept_slots)
    new_hidden = hidden_states.new_zeros(batch_size, lead + width, dim)
    new_positions = positions.new_full((batch_size, width), -1)
    new_cumulative = cumulative.new_zeros(batch_size, width)
    new_hidden[:, :lead] = hidden_states[:, :lead]
    for b, slots in enumerate(kept_slots):
        count = len(slots)
        new_hidden[b, lead : lead + count] = hidden_states[b, lead + slots]
        new_positions[b, :count] = positions[b, slots]
        new_cumulative[b, :count] = cumulative[b, slots]
    return new_hidden, new_positions, new_cumulative
