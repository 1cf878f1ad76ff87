"""Families whose images are fixed-size views, each made into a fixed grid of tokens (Gemma 3, InternVL).

A view is what the tower encodes in one pass: a Gemma 3 image or pan-and-scan crop, an InternVL
tile or thumbnail. The projector turns each square cell of patches into one token (Gemma 3
averages 4×4, InternVL's pixel shuffle concatenates 2×2), so the encoder stage prunes whole cells
(:class:`~flowcut.families.clip.GroupedPatchAdapter`) and a budget counts cells. ``keep`` is each
view's budget ``T``: the language model does not know how the views of a prompt group into images
(InternVL's tiles arrive as one run of tokens per image; Gemma 3's crops each have a run), and each
view keeps its place in the structure. Where a decoder layer prunes too (FlowCut's second stage,
FastV), each view keeps ``T`` of the tokens it brought (:func:`flowcut.methods.stages`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from flowcut import compat
from flowcut.config import FlowCutConfig
from flowcut.families.clip import GroupedPatchAdapter
from flowcut.families.single_stage import stock_image_trace
from flowcut.methods import UnitCall
from flowcut.runtime.encoding import media_encoding
from flowcut.runtime.family import EncoderWork, Handler
from flowcut.runtime.media import Kept, MediaItem, MediaKind, PassMedia, TwoStageFamily
from flowcut.trace import PruningTrace


class FixedViewFamily(TwoStageFamily):
    """A family of fixed-size views pruned by cells; subclasses say how the tower is grouped and projected."""

    same_counts_per_item = True

    def __init__(self, model: torch.nn.Module, config: FlowCutConfig, on_trace: Callable[[PruningTrace], None]):
        super().__init__(model, config, on_trace)
        self.check_feature_arguments(self.feature_arguments())
        self.encoder = self.grouped_tower()
        cells = self.encoder.num_patches
        if cells != self.tokens_per_view():
            raise ValueError(f"{cells} cells per view, but the model makes {self.tokens_per_view()} tokens per view")
        self.image_token_id = model.config.image_token_id
        budget = self.budget(cells)
        entering = cells
        if self.stages.encoder:  # FlowCut's two stages: 2T cells in the encoder, T after the decoder layer
            entering = min(cells, (2 if self.stages.language else 1) * budget)
        self.view = MediaItem(cells, entering, budget)
        """Every view's token counts: stock, entering the language model, after its pruning layer."""

    # -- what a family declares ---------------------------------------------------------------

    def grouped_tower(self) -> GroupedPatchAdapter:
        """The model's vision tower as an encoder-stage adapter on cells."""
        raise NotImplementedError

    def tokens_per_view(self) -> int:
        """The language-model tokens the stock model makes of one view."""
        raise NotImplementedError

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The language model's token of every unit slot, ``(B, N, D_unit) -> (B, N, D_text)`` (no query slots)."""
        raise NotImplementedError

    def feature_arguments(self) -> dict[str, Any]:
        """The arguments the stock ``get_image_features`` needs besides the pixels (the model's defaults)."""
        return {}

    def check_feature_arguments(self, arguments: dict[str, Any]) -> None:
        """Refuse features FlowCut's path does not make (another feature layer); nothing by default."""

    # -- model side -------------------------------------------------------------------------

    def entry_points(self) -> dict[str, Handler]:
        """This instance's image features go through FlowCut."""
        return {"get_image_features": self.image_features}

    def media_kinds(self) -> list[MediaKind]:
        return [MediaKind("image", self.image_token_id, "pixel_values", self._encode_views, self._planned_views)]

    def _encode_views(self, kwargs: dict[str, Any]) -> Any:
        return self.base.get_image_features(kwargs["pixel_values"], **self.feature_arguments())

    def _planned_views(self, kwargs: dict[str, Any]) -> list[MediaItem]:
        pixels = kwargs.get("pixel_values")
        return [] if pixels is None else [self.view] * pixels.shape[0]

    def image_features(
        self, stock: Callable[..., Any], pixel_values: torch.Tensor, **kwargs: Any
    ) -> compat.EncoderOutput | tuple:
        """FlowCut's replacement for the inner model's ``get_image_features``: each view's kept cells, projected.

        Where the tower prunes, ``last_hidden_state`` holds the kept units' states (a unit's patches side by
        side, the query token first where the tower has one), not every patch's.
        """
        arguments = {**self.feature_arguments(), **{k: v for k, v in kwargs.items() if v is not None}}
        self.check_feature_arguments(arguments)
        items = [self.view] * pixel_values.shape[0]
        cells, layers = self.encoder.num_patches, self.encoder.num_layers
        if self.view.placeholders >= cells:  # the encoder keeps every cell: the stock tower, bit for bit
            output = stock(pixel_values, **arguments)
            traces, seconds = [stock_image_trace(torch.arange(cells), layers, cells) for _ in items], None
        else:
            if arguments.get("output_hidden_states") or arguments.get("output_attentions"):
                raise ValueError(
                    "output_hidden_states and output_attentions are not available while FlowCut prunes the vision "
                    "tower (the pruned layers do not run over every patch); method='none' gives the stock outputs"
                )
            keeps = [self.view.placeholders] * len(items)
            # The projector reads the last layer's output: every layer runs, the one before it prunes last.
            call = UnitCall(self.config, self.encoder, pixel_values, layers - 1, keeps, project=self.project)
            with self.encoder.session() as encoder:
                stage = self.method.select_units(replace(call, encoder=encoder))
            pooled = self.project(stage.hidden_states[:, self.encoder.query_slots :])
            output = compat.encoder_output(last_hidden_state=stage.hidden_states, pooler_output=pooled)
            traces, seconds = stage.images, stage.scoring_seconds
        return media_encoding(output, (items, traces), seconds)

    def publish(self, media: PassMedia, kept: Kept | None, positions: torch.Tensor | None) -> None:
        """The views' traces: kept cells (row-major over the cell grid) and each view's token counts."""
        items, traces = media.items("image"), list(media.extra("image") or [])
        masks = (kept or {}).get("image") or [None] * len(items)
        tokens = []
        for index, (item, mask) in enumerate(zip(items, masks, strict=True)):
            if mask is not None:  # the decoder layer kept these of the tokens the view brought
                traces[index] = replace(traces[index], kept_indices=traces[index].kept_indices[mask.cpu()])
            tokens.append((item.stock_tokens, item.placeholders, len(traces[index].kept_indices)))
        seconds = media.scoring_seconds
        trace = PruningTrace(
            traces,
            self.encoder.grid_size,
            self.config.keep,
            self.encoder.num_layers - 1,
            positions,
            tokens,
            scoring_ms=None if seconds is None else 1000 * seconds,
        )
        self.on_trace(trace)

    @classmethod
    def encoder_work(cls, model: torch.nn.Module, trace: PruningTrace | None, inputs: Any) -> EncoderWork | None:
        """Every view of the prompt through the tower: the traces count cells, the layers process their patches."""
        vision = model.config.vision_config
        side = _first(vision.image_size) // _first(vision.patch_size)
        if trace is None:
            return [[side * side] * vision.num_hidden_layers] * inputs["pixel_values"].shape[0], None
        group = side * side // trace.num_patches
        return [[group * cells for cells in view.tokens_per_layer] for view in trace.images], None

    # -- processor side ---------------------------------------------------------------------

    def processor_image(self, stock_count: int, image_size: tuple[int, int] | None) -> MediaItem:
        """An image's run of placeholders: as many views as the stock count holds (InternVL's tiles)."""
        views, rest = divmod(stock_count, self.view.stock_tokens)
        if rest or not views:
            return self.view  # not this model's processor: the runtime says so
        return MediaItem(views * self.view.stock_tokens, views * self.view.placeholders, views * self.view.budget)


def _first(size: int | list[int]) -> int:
    """A square tower's side from its config (InternViT's sizes are ``[height, width]``)."""
    return size[0] if isinstance(size, (list, tuple)) else size
