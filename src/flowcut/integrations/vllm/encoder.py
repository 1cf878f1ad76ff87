"""FlowCut's encoder stage over vLLM's own CLIP vision encoder layers.

:class:`VllmClipEncoderAdapter` is a :class:`~flowcut.core.encoder_stage.VisionEncoderAdapter`: the
loop, schedule, cumulative scores and selection stay in :func:`flowcut.core.encoder_stage.run_encoder_stage`;
this module only says how to embed, how to run one of vLLM's ``CLIPEncoderLayer`` modules while
recording what its attention saw, and how to turn that into the criteria, reducing the per-head
terms across tensor-parallel ranks first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from flowcut.core.encoder_stage import AttentionRecord, AttentionRecorder
from flowcut.core.scoring import CriteriaHeadSums, CriteriaScores, cls_head_sums, criteria_from_head_sums

HeadReduction = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the tensor-parallel ranks that share the vision encoder's heads (an all-reduce)."""


class VllmClipEncoderAdapter:
    """Runs vLLM's ``CLIPVisionTransformer`` layer by layer for FlowCut's encoder stage.

    ``reduce_heads`` is given when the attention heads are split across tensor-parallel ranks: each
    rank sums the criteria terms over its own heads, the sums are all-reduced, and the averages are
    taken over every head, so all ranks compute the same scores and keep the same patches.
    """

    query_slots = 1
    """CLS sits at slot 0 and scores the patches."""

    def __init__(self, vision_model: nn.Module, reduce_heads: HeadReduction | None = None) -> None:
        self.embeddings = vision_model.embeddings
        self.pre_layernorm = vision_model.pre_layrnorm
        self.layers = list(vision_model.encoder.layers)
        attention = self.layers[0].self_attn
        self.total_heads: int = attention.num_heads
        self.local_heads: int = attention.num_heads_per_partition
        self.head_dim: int = attention.head_dim
        self.scaling: float = attention.scale
        if (self.local_heads != self.total_heads) != (reduce_heads is not None):
            raise ValueError(
                f"the vision encoder holds {self.local_heads} of {self.total_heads} heads on this rank: "
                "a head reduction is needed exactly when the heads are split across ranks"
            )
        self.reduce_heads = reduce_heads

    @property
    def num_layers(self) -> int:
        """Encoder layers that were built (vLLM builds them only up to the feature layer)."""
        return len(self.layers)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image."""
        return self.embeddings.num_patches

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLS + patch embeddings after the pre-layer norm, as vLLM's ``CLIPVisionTransformer`` computes them."""
        return self.pre_layernorm(self.embeddings(pixel_values))

    def run_layer(
        self,
        index: int,
        hidden_states: torch.Tensor,
        alive: torch.Tensor | None,
        recorder: AttentionRecorder | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run vLLM's encoder layer ``index``; record its attention inputs when ``recorder`` is given.

        vLLM's encoder attention takes no padding mask, so when images hold different numbers of live
        tokens (each image follows its own schedule) the images are run in groups of equal length,
        without padding; each image is computed exactly as it would be alone. CLIP's position
        embeddings were added at the input, so ``positions`` is not needed.
        """
        layer = self.layers[index]
        batch_size, slots, _ = hidden_states.shape
        lengths = [slots] * batch_size if alive is None else alive.sum(dim=1).tolist()
        groups: dict[int, list[int]] = {}
        for row, length in enumerate(lengths):
            groups.setdefault(int(length), []).append(row)

        if len(groups) == 1:
            with self._recording(layer, recorder is not None) as captured:
                output = layer(hidden_states)
            if recorder is not None:
                recorder.capture(*captured[0], self.scaling)
            return output

        output = torch.zeros_like(hidden_states)
        records: list[tuple[list[int], int, tuple[torch.Tensor, ...]]] = []
        for length, rows in groups.items():
            index_rows = torch.tensor(rows, device=hidden_states.device)
            with self._recording(layer, recorder is not None) as captured:
                output[index_rows, :length] = layer(hidden_states[index_rows, :length])
            if recorder is not None:
                records.append((rows, length, captured[0]))
        if recorder is not None:
            recorder.capture(*_pad_records(records, batch_size, slots), self.scaling)
        return output

    def criteria(self, record: AttentionRecord, alive: torch.Tensor | None) -> CriteriaScores:
        """CLS-view criteria (SPEC §2 steps 1–3) over all heads, reduced across ranks when the heads are split."""
        sums = cls_head_sums(record.query, record.key, record.value, record.scaling, alive)
        if self.reduce_heads is not None:
            sums = CriteriaHeadSums(
                relation=self.reduce_heads(sums.relation.contiguous()),
                semantic=self.reduce_heads(sums.semantic.contiguous()),
                value=self.reduce_heads(sums.value.contiguous()),
                heads=self.total_heads,
            )
        return criteria_from_head_sums(sums)

    @contextmanager
    def _recording(self, layer: nn.Module, record: bool) -> Iterator[list[tuple[torch.Tensor, ...]]]:
        """Capture the (query, key, value) the layer's attention module receives, as ``(B, H, K, d)``.

        A forward pre-hook on this one module instance, removed when the layer has run: vLLM's attention
        kernel itself is untouched and the attention matrix is never formed.
        """
        captured: list[tuple[torch.Tensor, ...]] = []
        if not record:
            yield captured
            return

        def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            query, key, value = (args + tuple(kwargs[name] for name in ("query", "key", "value") if name in kwargs))[:3]
            captured.append(tuple(self._split_heads(tensor) for tensor in (query, key, value)))

        handle = layer.self_attn.attn.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            yield captured
        finally:
            handle.remove()

    def _split_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(B, K, H·d)`` (or ``(B, K, H, d)``) as this rank's ``(B, H, K, d)`` heads."""
        batch_size, slots = tensor.shape[:2]
        return tensor.reshape(batch_size, slots, self.local_heads, self.head_dim).transpose(1, 2)


def _pad_records(
    records: list[tuple[list[int], int, tuple[torch.Tensor, ...]]], batch_size: int, slots: int
) -> tuple[torch.Tensor, ...]:
    """Join per-group ``(q, k, v)`` captures into ``(B, H, slots, d)`` tensors, zeros in the padding slots.

    The padding slots are masked out of every score by the stage's ``alive`` mask.
    """
    first = records[0][2][0]
    padded = [first.new_zeros(batch_size, first.shape[1], slots, first.shape[3]) for _ in range(3)]
    for rows, length, tensors in records:
        index_rows = torch.tensor(rows, device=first.device)
        for target, tensor in zip(padded, tensors, strict=True):
            target[index_rows, :, :length] = tensor
    return tuple(padded)
