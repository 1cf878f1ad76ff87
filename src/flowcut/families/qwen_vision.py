"""Encoder-stage adapter for Qwen2-VL and Qwen2.5-VL vision towers (no CLS, 2-D rotary, patch merger).

Units and order. The tower's patch merger fuses each 2x2 block of patches (four consecutive
tokens of the packed sequence) into one language-model token. The encoder stage therefore prunes
whole merge groups: a unit is one group, its hidden state the four patch states side by side
(``(4·D)``), and the merger still fuses real neighbours. (The authors' Qwen2-VL code prunes single
patches, which lets the merger fuse patches from different places.) Units stay in the tower's own
order (row-major over the merged grid); kept units keep their own rotary angles.

Attention. Each layer runs the tower's own block on a packed sequence of the alive patches of all
images, with ``cu_seqlens`` built from the images' alive counts, so images never attend to each
other. Qwen2.5-VL's windowed blocks get the same windows as the stock tower (windows of the merged
grid, laid out from each unit's original position): the alive patches are ordered window by window
for the block and put back afterwards. Attention within a window or an image does not depend on
token order, so no reordering of the stage's own bookkeeping is needed.

Scoring (SPEC §4). A global token stands in for CLS: per head, the mean of the image's alive
(post-rotary) queries attends over the image's alive keys. A patch's score is ``a · n``; a group's
relation is the attention its four patches receive together, its density their mean value norm.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from flowcut import compat
from flowcut.core.encoder_stage import AttentionRecord, AttentionRecorder
from flowcut.core.scoring import CriteriaScores, global_query_criteria, group_criteria, grouped, received_attention
from flowcut.runtime.attention import recording_attention, resolve_attention


class QwenVisionAdapter:
    """Runs a Qwen2-VL / Qwen2.5-VL vision tower block by block on merge-group units."""

    query_slots = 0
    """No CLS: the global token is computed from the units."""

    def __init__(self, visual: torch.nn.Module) -> None:
        self.visual = visual
        self.blocks = list(visual.blocks)
        self.merge_size = int(visual.spatial_merge_size)
        self.group = self.merge_size**2
        full = getattr(visual, "fullatt_block_indexes", None)
        self.windowed_blocks = set() if full is None else {i for i in range(len(self.blocks)) if i not in set(full)}
        self.window_units = visual.window_size // self.merge_size // visual.patch_size if self.windowed_blocks else 0
        self.config = visual.config
        self._eager = compat.eager_attention(self.blocks[0].attn)
        self.deepstack_layers = compat.deepstack_layers(visual)
        """Qwen3-VL: the blocks whose outputs DeepStack hands to the language model ([] elsewhere)."""
        self.learned_positions = hasattr(visual, "pos_embed")
        """Qwen3-VL adds a learned position grid, resampled to each image, to the patch embeddings."""
        # Set only on the pass adapter session() yields: its images' grids, and their rotary angles once embedded.
        self._grid_thw: torch.Tensor | None = None
        self._grids: list[tuple[int, int]] = []
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self._deepstack: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """Per DeepStack block: its output and the units its slots hold (this pass's units only)."""

    @property
    def num_layers(self) -> int:
        """Number of vision blocks."""
        return len(self.blocks)

    @staticmethod
    def unit_grids(grid_thw: torch.Tensor, merge_size: int) -> list[tuple[int, int]]:
        """Per image, the merged grid (rows, columns) its units form; images only (one temporal patch)."""
        grids = []
        for t, h, w in grid_thw.tolist():
            if t != 1:
                raise ValueError(
                    f"FlowCut's Qwen encoder stage prunes images (one temporal patch), got grid_thw ({t}, {h}, {w})"
                )
            grids.append((h // merge_size, w // merge_size))
        return grids

    @contextmanager
    def session(self, grid_thw: torch.Tensor) -> Iterator[QwenVisionAdapter]:
        """One pass over a batch of images (their ``grid_thw``): yields the pass's adapter, a copy bound
        to them; this adapter itself holds nothing of the pass."""
        bound = copy.copy(self)
        bound._grids = self.unit_grids(grid_thw, self.merge_size)
        bound._grid_thw = grid_thw
        bound._deepstack = {}
        yield bound

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embeddings grouped into units and padded per image: ``(B, N_max, 4·D)``.

        The rotary angles of every patch are computed here once, as the tower computes them.
        """
        if self._grid_thw is None:
            raise RuntimeError("embed needs the adapter QwenVisionAdapter.session() yields")
        patches = self.visual.patch_embed(pixel_values.type(self.visual.dtype))
        if self.learned_positions:
            patches = patches + compat.interpolated_position_embeddings(self.visual, self._grid_thw).to(patches.dtype)
        position_ids = compat.vision_position_ids(self._grid_thw, self.merge_size)
        cos, sin = self.visual.rotary_pos_emb(patches, position_ids)
        counts = [rows * columns for rows, columns in self._grids]
        sizes = [count * self.group for count in counts]
        self._rotary = (_pad_units(cos, sizes, self.group), _pad_units(sin, sizes, self.group))
        return _pad_units(patches, sizes, self.group)

    def run_layer(
        self,
        index: int,
        hidden_states: torch.Tensor,
        alive: torch.Tensor | None,
        recorder: AttentionRecorder | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run block ``index`` on the alive units of every image, packed; record q/k/v when asked."""
        if self._rotary is None:
            raise RuntimeError("run_layer needs the adapter QwenVisionAdapter.session() yields, after its embed()")
        batch, width, unit_dim = hidden_states.shape
        dim = unit_dim // self.group
        counts = [width] * batch if alive is None else alive.sum(dim=1).tolist()
        if positions is None:
            positions = torch.arange(width, device=hidden_states.device).expand(batch, -1)
        order, segments = self._packing(index, counts, positions)
        rows, slots = order
        packed = hidden_states[rows, slots].reshape(-1, dim)
        cos, sin = (
            table[rows, positions[rows, slots]].reshape(-1, table.shape[-1] // self.group) for table in self._rotary
        )
        cu_seqlens = torch.tensor([0, *segments], device=packed.device).cumsum(0).to(torch.int32) * self.group
        options: dict[str, Any] = {}
        switch = nullcontext()
        if recorder is not None:
            recorder.layout = (order, counts)  # the records say how the packed tokens map to images
            implementation = compat.attention_implementation(self.config)
            options = {
                "flowcut_recorder": recorder,
                "flowcut_attention": resolve_attention(implementation, self._eager),
                "flowcut_implementation": implementation,
            }
            switch = recording_attention([self.config])
        with switch:
            output = self.blocks[index](
                packed,
                cu_seqlens=cu_seqlens,
                max_seqlen=max(segments) * self.group,
                position_embeddings=(cos, sin),
                **options,
            )
        result = hidden_states.new_zeros(batch, width, unit_dim)
        result[rows, slots] = output.reshape(-1, unit_dim)
        if index in self.deepstack_layers:  # every unit kept at the end is alive here
            self._deepstack[index] = (result, positions)
        return result

    def deepstack(self, kept_units: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """DeepStack's features of each row's kept units (ascending unit indices): per DeepStack block, per row.

        A unit's feature is the DeepStack merger applied to its own state after that block, whether
        or not other units were pruned before it, as the stock tower computes it for every unit.
        """
        features = []
        for block in self.deepstack_layers:
            states, positions = self._deepstack[block]
            merger = compat.deepstack_merger(self.visual, block)
            dim = states.shape[-1] // self.group
            per_row = []
            for row, kept in enumerate(kept_units):
                slot_of = {int(unit): slot for slot, unit in enumerate(positions[row].tolist()) if unit >= 0}
                slots = torch.tensor([slot_of[int(unit)] for unit in kept], dtype=torch.long, device=states.device)
                per_row.append(merger(states[row, slots].reshape(-1, dim)))
            features.append(per_row)
        return features

    def _packing(
        self, index: int, counts: list[int], positions: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], list[int]]:
        """The (row, slot) of each packed unit and the attention segments (in units) for block ``index``."""
        device = positions.device
        rows, slots, segments = [], [], []
        for b, count in enumerate(counts):
            unit_slots = torch.arange(count, device=device)
            if index in self.windowed_blocks:
                window = self._window_ids(positions[b, :count], self._grids[b])
                unit_slots = unit_slots[window.argsort(stable=True)]
                segments.extend(window.bincount()[window.unique()].tolist())
            else:
                segments.append(count)
            rows.append(torch.full_like(unit_slots, b))
            slots.append(unit_slots)
        return (torch.cat(rows), torch.cat(slots)), segments

    def _window_ids(self, units: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Qwen2.5-VL's attention window of each unit (row-major over the windows of the merged grid)."""
        size = self.window_units
        columns = grid[1]
        windows_across = -(-columns // size) if columns % size else columns // size + 1
        # The stock tower pads each side by a full window when it divides evenly; the extra windows are empty.
        return (units // columns // size) * windows_across + (units % columns) // size

    def criteria(self, record: AttentionRecord, alive: torch.Tensor | None) -> CriteriaScores:
        """Global-token criteria per patch, grouped into units (SPEC §4)."""
        query, key, value = (self._per_patch(record, tensor) for tensor in (record.query, record.key, record.value))
        patch_alive = None
        if alive is not None:
            patch_alive = alive.repeat_interleave(self.group, dim=1)
        per_patch = global_query_criteria(query, key, value, record.scaling, patch_alive)
        return group_criteria(per_patch, self.group)

    def received_attention(self, record: AttentionRecord, alive: torch.Tensor | None) -> torch.Tensor:
        """The attention each unit's patches receive together from every patch of its image: ``(B, N)``.

        Over the whole image, as if every block attended globally (Qwen2.5-VL's windowed blocks do not).
        """
        query, key = (self._per_patch(record, tensor) for tensor in (record.query, record.key))
        patch_alive = None if alive is None else alive.repeat_interleave(self.group, dim=1)
        return grouped(received_attention(query, key, record.scaling, patch_alive), self.group)

    def unit_keys(self, record: AttentionRecord, alive: torch.Tensor | None) -> torch.Tensor:
        """Each unit's key: its patches' keys averaged over heads and over the group, ``(B, N, d)``."""
        key = self._per_patch(record, record.key)
        batch, _, patches, head_dim = key.shape
        return key.mean(dim=1).view(batch, patches // self.group, self.group, head_dim).mean(dim=2)

    def _per_patch(self, record: AttentionRecord, tensor: torch.Tensor) -> torch.Tensor:
        """A packed ``(1, H, total, d)`` projection of ``record``, per image: ``(B, H, N_max·group, d)``."""
        if record.layout is None:
            raise RuntimeError("a Qwen vision record needs the packing of its layer (run_layer sets it)")
        (rows, slots), counts = record.layout
        batch, width = len(counts), max(counts)
        heads, head_dim = tensor.shape[1], tensor.shape[-1]
        per_patch = tensor[0].transpose(0, 1).reshape(-1, self.group, heads, head_dim)
        padded = per_patch.new_zeros(batch, width, self.group, heads, head_dim)
        padded[rows, slots] = per_patch
        return padded.reshape(batch, width * self.group, heads, head_dim).transpose(1, 2)

    def project_units(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The merger's output for every unit slot: ``(B, N, 4·D) -> (B, N, D_text)`` (padding slots too)."""
        batch, width, unit_dim = hidden_states.shape
        merged = self.visual.merger(hidden_states.reshape(-1, unit_dim // self.group))
        return merged.view(batch, width, -1)

    def merge(self, hidden_states: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """The merger's output for each image's first ``counts[b]`` units: ``(count, D_text)`` per image."""
        dim = hidden_states.shape[-1] // self.group
        return [self.visual.merger(hidden_states[b, :count].reshape(-1, dim)) for b, count in enumerate(counts)]


def _pad_units(values: torch.Tensor, sizes: list[int], group: int) -> torch.Tensor:
    """Split a packed ``(total, C)`` tensor into images of ``sizes`` tokens and group them: ``(B, N_max, group·C)``."""
    images = values.split(sizes)
    width = max(sizes) // group
    padded = values.new_zeros(len(sizes), width, group * values.shape[-1])
    for b, image in enumerate(images):
        padded[b, : len(image) // group] = image.reshape(-1, group * values.shape[-1])
    return padded
