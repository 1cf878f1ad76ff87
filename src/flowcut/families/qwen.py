"""Qwen2-VL and Qwen2.5-VL family adapter (dynamic resolution, no CLS, M-RoPE).

Two stages, as SPEC §4 defines them for Qwen2-VL. With a budget of ``T`` tokens for an image of
``n`` merged tokens:

1. Encoder stage (``method="flowcut"``): the shared progressive stage runs over the vision blocks on
   2x2 merge groups (see :mod:`flowcut.families.qwen_vision`) and keeps ``min(n, 2T)`` groups; the
   tower's merger turns them into as many language-model tokens. The processor writes that many
   image placeholders, so the model's own placeholder check stays on.
2. Language-model stage: after decoder layer 1 each image keeps its best ``T`` tokens (SPEC §3,
   FlowCut score; FastV's attention score for ``method="fastv"``, which skips stage 1).

The other encoder methods (VisionZip, DivPrune, pool, random) keep ``T`` groups in stage 1 and skip
stage 2 (:func:`flowcut.methods.stages`).

Positions (M-RoPE). Every kept visual token keeps the (t, h, w) position it has in the unpruned
model and every text token keeps its unpruned position; new tokens continue from the unpruned
prompt's positions. (The authors' code gives the kept tokens the first grid positions instead.)
The positions are computed by the model's own ``get_rope_index`` on the unpruned layout and then
gathered for the tokens that remain. Images of one prompt, and of one batch, are never mixed by
the selection; each image has its own budget, and rows of a batch that keep different numbers of
tokens are padded with hidden filler slots after layer 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from flowcut import compat
from flowcut.config import FlowCutConfig, frame_budgets
from flowcut.core.encoder_stage import ImageTrace
from flowcut.families.qwen_vision import QwenVisionAdapter
from flowcut.methods import UnitCall
from flowcut.runtime.encoding import media_encoding
from flowcut.runtime.family import EncoderWork, Handler
from flowcut.runtime.media import Kept, MediaItem, MediaKind, PassMedia, TwoStageFamily
from flowcut.trace import PruningTrace

IMAGE, VIDEO = 1, 2
"""The processor's ``mm_token_type_ids`` of image and video placeholders."""


@dataclass
class _Media:
    """One image or video of a pass: its grid, budget, placeholder counts and, once encoded, its kept cells."""

    slices: int
    """Temporal patches: 1 for an image; for a video, its frames taken ``temporal_patch_size`` at a time."""
    grid: tuple[int, int]
    """Merged grid (rows, columns) of one slice."""
    budget: int
    """``T``: the item's tokens that the language model's later layers see."""
    slice_placeholders: list[int]
    """Per slice, the tokens entering the language model (after the encoder stage)."""
    kept_units: torch.Tensor | None = None
    """Cells the encoder kept, slice-major over ``slices × grid``; None where the encoder did not prune."""
    encoder_slices: list[ImageTrace] | None = None
    """Per slice, the encoder stage's trace (None where the encoder did not prune)."""
    runs_per_slice: bool = False
    """Whether the prompt holds each slice's placeholders as a run of its own (Qwen3-VL's videos put a
    timestamp between slices), else the item's as one run."""

    @property
    def cells_per_slice(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def cells(self) -> int:
        """Tokens of the item in the unpruned model."""
        return self.slices * self.cells_per_slice

    stock_tokens = cells

    @property
    def placeholders(self) -> int:
        """Tokens of the item entering the language model."""
        return sum(self.slice_placeholders)

    @property
    def runs(self) -> tuple[int, ...]:
        """The placeholders of each run the prompt holds for the item."""
        return tuple(self.slice_placeholders) if self.runs_per_slice else (self.placeholders,)

    def run_cells(self, run: int, kept_units: torch.Tensor | None) -> tuple[int, torch.Tensor]:
        """Run ``run``'s grid cells in the unpruned layout, and which of them its placeholders are (ascending):
        ``kept_units`` (slice-major), or before encoding the first cells."""
        cells = self.cells_per_slice if self.runs_per_slice else self.cells
        count = self.runs[run]
        if kept_units is None:
            return cells, torch.arange(count)
        kept = kept_units.cpu().long()
        if self.runs_per_slice:
            kept = kept[kept // cells == run] - run * cells
        return cells, kept


def _per_item(slices: list[torch.Tensor], items: list[_Media]) -> tuple[torch.Tensor, ...]:
    """Per-slice tokens joined into each item's tokens (an image is one slice, a video several)."""
    joined, first = [], 0
    for item in items:
        joined.append(torch.cat(slices[first : first + item.slices]))
        first += item.slices
    return tuple(joined)


class QwenFamily(TwoStageFamily):
    """Installs FlowCut on one Qwen2-VL / Qwen2.5-VL instance and removes it again."""

    model_classes = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    family_name = "Qwen2-VL"
    timestamped_videos = False
    """Whether the processor writes a timestamp before each temporal slice of a video (Qwen3-VL, Qwen3.5)."""

    def __init__(self, model: torch.nn.Module, config: FlowCutConfig, on_trace: Callable[[PruningTrace], None]):
        super().__init__(model, config, on_trace)
        self.encoder = QwenVisionAdapter(self.base.visual)
        self.image_token_id = model.config.image_token_id
        self.video_token_id = model.config.video_token_id

    # -- budgets ------------------------------------------------------------------------------

    def _slice_placeholders(self, slices: int, per_slice: int) -> tuple[int, list[int]]:
        """An item's budget ``T`` and, per slice, its tokens entering the language model.

        A video's ``T`` is first split over its temporal slices (:func:`flowcut.config.frame_budgets`).
        FlowCut's encoder stage keeps ``min(n, 2T)`` per image, twice each slice's share (SPEC §4), for the
        language-model stage to finish; the other encoder methods keep ``T`` (each slice its share).
        """
        budget = self.budget(slices * per_slice)
        if not self.stages.encoder:
            return budget, [per_slice] * slices
        factor = 2 if self.stages.language else 1
        return budget, [
            min(per_slice, factor * share)
            for share in frame_budgets(budget, slices, per_slice, "temporal patches", self.config.keep)
        ]

    def _media(self, grid_thw: torch.Tensor | None, kind: str) -> list[_Media]:
        """The items of one kind, from their ``grid_thw``."""
        if grid_thw is None:
            return []
        items = []
        runs_per_slice = kind == "video" and self.timestamped_videos
        for slices, height, width in grid_thw.tolist():
            grid = (height // self.encoder.merge_size, width // self.encoder.merge_size)
            budget, placeholders = self._slice_placeholders(slices, grid[0] * grid[1])
            items.append(_Media(slices, grid, budget, placeholders, runs_per_slice=runs_per_slice))
        return items

    # -- model side -------------------------------------------------------------------------

    def entry_points(self) -> dict[str, Handler]:
        """This instance's image and video features and its positions go through FlowCut."""
        return {
            "get_image_features": self.image_features,
            "get_video_features": self.video_features,
            "get_rope_index": self.rope_index,
        }

    def image_features(
        self,
        stock: Callable[..., Any],
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> compat.EncoderOutput | tuple:
        return self.encode("image", pixel_values, image_grid_thw, **kwargs)

    def video_features(
        self,
        stock: Callable[..., Any],
        pixel_values_videos: torch.Tensor,
        video_grid_thw: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> compat.EncoderOutput | tuple:
        return self.encode("video", pixel_values_videos, video_grid_thw, **kwargs)

    def encode(
        self, kind: str, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None, **kwargs: Any
    ) -> compat.EncoderOutput | tuple:
        """FlowCut's replacement for ``get_image_features`` / ``get_video_features``: each item's kept groups, merged.

        A video's temporal slices are encoded as images of one slice each: the tower attends within a
        slice only (its ``cu_seqlens``), and its rotary angles and Qwen2.5-VL windows repeat per slice,
        so this is the stock computation, slice by slice.
        """
        if grid_thw is None:
            raise ValueError(f"FlowCut's Qwen encoder stage needs {kind}_grid_thw (the processor returns it)")
        items = self._media(grid_thw, kind)
        if all(item.placeholders == item.cells for item in items):
            # No item is over its encoder budget: the stock tower, bit for bit.
            output = self.stock[f"get_{kind}_features"](pixel_values, grid_thw, **kwargs)
            return media_encoding(output, (items, grid_thw))
        slice_grid_thw = grid_thw.repeat_interleave(grid_thw[:, 0], dim=0)
        slice_grid_thw[:, 0] = 1
        counts = [item.cells_per_slice for item in items for _ in range(item.slices)]
        keeps = [count for item in items for count in item.slice_placeholders]
        # The merger reads the last block's output: every block runs, the last before it prunes last.
        rows = list(pixel_values.split([count * self.encoder.group for count in counts]))
        call = UnitCall(
            self.config,
            self.encoder,
            pixel_values,
            self.encoder.num_layers - 1,
            keeps,
            counts,
            project=self.encoder.project_units,
            pixel_rows=rows,
            grids=[item.grid for item in items for _ in range(item.slices)],
        )
        with self.encoder.session(slice_grid_thw) as encoder:
            stage = self.method.select_units(replace(call, encoder=encoder))
            features = encoder.merge(stage.hidden_states, stage.counts)
            deepstack = encoder.deepstack([image.kept_indices for image in stage.images])
        first = 0
        for item in items:
            slices = range(first, first + item.slices)
            item.encoder_slices = [stage.images[index] for index in slices]
            item.kept_units = torch.cat(
                [stage.images[index].kept_indices + k * item.cells_per_slice for k, index in enumerate(slices)]
            )
            first += item.slices
        output = compat.encoder_output(last_hidden_state=stage.hidden_states, pooler_output=_per_item(features, items))
        if deepstack:  # Qwen3-VL: the DeepStack features of the same kept units
            fields = dict(output.items())
            output = compat.DeepstackEncoderOutput(
                **fields, deepstack_features=[_per_item(layer, items) for layer in deepstack]
            )
        return media_encoding(output, (items, grid_thw), stage.scoring_seconds)

    def rope_index(
        self,
        stock: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        input_ids: torch.Tensor,
        mm_token_type_ids: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        *args: Any,
        attention_mask: torch.Tensor | None = None,
        kept_units: dict[int, list[torch.Tensor | None]] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``get_rope_index`` for prompts whose images and videos hold fewer placeholders than grid cells.

        The prompt is expanded back to the unpruned layout, the stock function computes the
        positions, and each remaining token takes its own: a kept visual token the position of its
        cell (``kept_units`` per token type; before the encoder has run, the first cells stand in),
        every other token its unpruned position. The deltas are shifted so new tokens continue the
        unpruned prompt.
        """
        if mm_token_type_ids is None or (image_grid_thw is None and video_grid_thw is None):
            return stock(
                input_ids,
                mm_token_type_ids,
                image_grid_thw,
                video_grid_thw,
                *args,
                attention_mask=attention_mask,
                **kwargs,
            )
        media = {IMAGE: self._media(image_grid_thw, "image"), VIDEO: self._media(video_grid_thw, "video")}
        self.check_placeholders(input_ids, {"image": media[IMAGE], "video": media[VIDEO]})
        token_ids = {IMAGE: self.image_token_id, VIDEO: self.video_token_id}
        visible = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        types = mm_token_type_ids.masked_fill(~visible, 0).tolist()
        expanded, sources, extra = [], [], []
        taken = {IMAGE: 0, VIDEO: 0}
        runs_taken = {IMAGE: 0, VIDEO: 0}  # runs of the current item already read (Qwen3-VL videos: one per slice)
        for b in range(input_ids.shape[0]):
            row_ids, row_types, row_visible = [], [], []
            source = torch.zeros(input_ids.shape[1], dtype=torch.long)
            added, position = 0, 0
            while position < input_ids.shape[1]:
                kind = types[b][position]
                if kind not in media:
                    source[position] = len(row_ids)
                    row_ids.append(int(input_ids[b, position]))
                    row_types.append(int(mm_token_type_ids[b, position]))
                    row_visible.append(bool(visible[b, position]))
                    position += 1
                    continue
                name = "image" if kind == IMAGE else "video"
                index = taken[kind]
                if index >= len(media[kind]):
                    raise ValueError(f"the prompts hold {name} placeholders for more than the {len(media[kind])} given")
                item, run = media[kind][index], runs_taken[kind]
                count = item.runs[run]
                if types[b][position : position + count] != [kind] * count:
                    raise ValueError(f"{name} {index} needs a run of {count} {name} placeholders in its prompt")
                cells, chosen = item.run_cells(run, None if kept_units is None else kept_units[kind][index])
                source[position : position + count] = len(row_ids) + chosen
                row_ids.extend([token_ids[kind]] * cells)
                row_types.extend([kind] * cells)
                row_visible.extend([True] * cells)
                added += cells - count
                position += count
                runs_taken[kind] = (run + 1) % len(item.runs)
                taken[kind] += runs_taken[kind] == 0
            expanded.append((row_ids, row_types, row_visible))
            sources.append(source)
            extra.append(added)
        for kind, items in media.items():
            if taken[kind] != len(items) or runs_taken[kind]:
                name = "image" if kind == IMAGE else "video"
                raise ValueError(
                    f"the prompts hold {name} placeholders for {taken[kind]} {name}s, but {len(items)} were given"
                )
        width = max(len(row[0]) for row in expanded)
        device = input_ids.device

        def padded(rows: list[list[Any]], fill: Any, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([row + [fill] * (width - len(row)) for row in rows], dtype=dtype, device=device)

        full_ids = padded([row[0] for row in expanded], 0, input_ids.dtype)
        full_types = padded([row[1] for row in expanded], 0, mm_token_type_ids.dtype)
        full_visible = padded([row[2] for row in expanded], False, torch.long)
        positions, deltas = stock(
            full_ids, full_types, image_grid_thw, video_grid_thw, *args, attention_mask=full_visible, **kwargs
        )
        source = torch.stack(sources).to(device)
        gathered = positions.gather(2, source[None].expand(positions.shape[0], -1, -1))
        gathered = gathered.masked_fill(~visible[None], 0)
        return gathered, deltas + torch.tensor(extra, device=deltas.device, dtype=deltas.dtype)[:, None]

    def media_kinds(self) -> list[MediaKind]:
        pixels = {"image": "pixel_values", "video": "pixel_values_videos"}
        token_ids = {"image": self.image_token_id, "video": self.video_token_id}
        return [
            MediaKind(
                kind, token_ids[kind], pixels[kind], partial(self._encode_pass_kind, kind), partial(self._planned, kind)
            )
            for kind in ("image", "video")
        ]

    def _encode_pass_kind(self, kind: str, kwargs: dict[str, Any]) -> Any:
        pixels = kwargs["pixel_values" if kind == "image" else "pixel_values_videos"]
        grid = kwargs.get(f"{kind}_grid_thw")
        if grid is None:
            raise ValueError(f"FlowCut's Qwen path needs {kind}_grid_thw (the processor returns it)")
        return self.encode(kind, pixels, grid)

    def _planned(self, kind: str, kwargs: dict[str, Any]) -> list[_Media]:
        return self._media(kwargs.get(f"{kind}_grid_thw"), kind)

    def visual_tokens(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Where the processor marks the visual tokens (``mm_token_type_ids``), a generated placeholder id is text."""
        token_types = kwargs.get("mm_token_type_ids")
        if token_types is None:
            return super().visual_tokens(input_ids, kwargs)
        return (token_types == IMAGE) | (token_types == VIDEO)

    def adjust_pass(self, input_ids: torch.Tensor, kwargs: dict[str, Any], media: PassMedia) -> None:
        """Give the kept visual tokens their own grid positions (M-RoPE) in this pass's position ids."""
        if all(item.kept_units is None for item in media.all_items):
            return
        token_types = kwargs.get("mm_token_type_ids")
        if token_types is None:
            raise ValueError("Qwen's M-RoPE positions need mm_token_type_ids (the processor returns them)")
        extra = {}
        if kwargs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kwargs["second_per_grid_ts"]
        positions, deltas = self.rope_index(
            self.stock["get_rope_index"],
            input_ids,
            token_types,
            media.extra("image"),
            media.extra("video"),
            attention_mask=kwargs.get("attention_mask"),
            kept_units={
                IMAGE: [item.kept_units for item in media.items("image")],
                VIDEO: [item.kept_units for item in media.items("video")],
            },
            **extra,
        )
        given = kwargs.get("position_ids")
        if given is not None and given.dim() == 3 and given.shape[0] == 4:
            positions = torch.cat([given[:1], positions.to(given.device)], dim=0)  # row 0: text positions for masks
        kwargs["position_ids"] = positions
        self.base.rope_deltas = deltas

    # -- traces -------------------------------------------------------------------------------

    def _slice_traces(self, item: _Media, cells: torch.Tensor) -> list[ImageTrace]:
        """Per slice of an item, its trace with the slice's own cells among ``cells`` (slice-major cell indices)."""
        layers, per_slice = self.encoder.num_layers, item.cells_per_slice
        traces = []
        for index in range(item.slices):
            inside = cells[cells // per_slice == index] % per_slice
            if item.encoder_slices is None:
                traces.append(ImageTrace(inside, [per_slice] * layers, [], [None] * layers))
            else:
                traces.append(replace(item.encoder_slices[index], kept_indices=inside))
        return traces

    def publish(self, media: PassMedia, kept: Kept | None, positions: torch.Tensor | None) -> None:
        """The trace of a pass: images (one slice each) and videos (per slice), with unpruned/entering/kept counts."""

        def kept_cells(kind: str) -> list[torch.Tensor]:
            items = media.items(kind)
            masks = (kept or {}).get(kind) or [None] * len(items)
            cells = []
            for item, mask in zip(items, masks, strict=True):
                entering = torch.arange(item.cells) if item.kept_units is None else item.kept_units
                cells.append(entering if mask is None else entering[mask.cpu()])
            return cells

        def tokens(items: list[_Media], cells: list[torch.Tensor]) -> list[tuple[int, int, int]]:
            return [(item.cells, item.placeholders, len(kept)) for item, kept in zip(items, cells, strict=True)]

        images, videos = media.items("image"), media.items("video")
        image_cells, video_cells = kept_cells("image"), kept_cells("video")
        image_traces = [self._slice_traces(item, cells)[0] for item, cells in zip(images, image_cells, strict=True)]
        video_traces = [self._slice_traces(item, cells) for item, cells in zip(videos, video_cells, strict=True)]
        seconds = media.scoring_seconds
        trace = PruningTrace(
            image_traces,
            media.all_items[0].grid,
            self.config.keep,
            self.encoder.num_layers - 1,
            positions,
            tokens(images, image_cells),
            image_grids=[item.grid for item in images],
            videos=video_traces if videos else None,
            video_keep=self.config.keep if videos else None,
            video_tokens=tokens(videos, video_cells) if videos else None,
            video_grids=[item.grid for item in videos] if videos else None,
            scoring_ms=None if seconds is None else 1000 * seconds,
        )
        self.on_trace(trace)

    @classmethod
    def encoder_work(cls, model: torch.nn.Module, trace: PruningTrace | None, inputs: Any) -> EncoderWork | None:
        """Every temporal slice an encoder pass; the merger maps the units the passes hand on."""
        if model.config.model_type not in ("qwen2_vl", "qwen3_vl"):
            return None  # Qwen2.5-VL's windowed attention and Qwen3-VL-MoE's experts are not counted yet
        video = inputs.get("pixel_values_videos") is not None
        traced = []
        if trace is not None:
            traced = ((trace.videos or [[]])[0] or []) if video else trace.images[:1]
        slices, rows, columns = (int(v) for v in inputs["video_grid_thw" if video else "image_grid_thw"][0])
        # Qwen traces count merge groups; the tower's layers process their patches, the merger their groups.
        group = model.config.vision_config.spatial_merge_size**2
        if traced:
            layers = [[group * units for units in image.tokens_per_layer] for image in traced]
            return layers, sum(image.units_handed_on for image in traced)
        return [[rows * columns] * model.config.vision_config.depth] * slices, slices * rows * columns // group

    # -- processor side ---------------------------------------------------------------------

    def processor_image(self, stock_count: int, image_size: tuple[int, int] | None) -> MediaItem:
        budget, placeholders = self._slice_placeholders(1, stock_count)
        return MediaItem(stock_count, sum(placeholders), budget)

    def processor_video(self, video_inputs: dict, index: int) -> MediaItem:
        slices, rows, columns = (int(side) for side in video_inputs["video_grid_thw"][index])
        per_slice = rows * columns // self.encoder.group
        budget, placeholders = self._slice_placeholders(slices, per_slice)
        runs = tuple(placeholders) if self.timestamped_videos and slices > 1 else ()
        return MediaItem(slices * per_slice, sum(placeholders), budget, runs)
