"""Families whose views are fixed-size images of a CLIP tower, pruned once (LLaVA-1.5, Video-LLaVA).

A view (an image, a video frame) is pruned inside the encoder by the method's :meth:`~flowcut.methods.Method.run`
to its budget and projected; a method that prunes inside the language model (FastV) hands every
patch over and a decoder layer prunes (:mod:`flowcut.runtime.language`). Every image has the same
patch count, so a ratio ``keep`` is one budget for every image, and a ``keep`` at or above it runs
the stock path, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from flowcut import compat
from flowcut.config import FlowCutConfig, tokens_to_keep
from flowcut.core.encoder_stage import ImageTrace
from flowcut.families.clip import ClipEncoderAdapter, check_select_strategy, feature_layer_index, frames_encoder_work
from flowcut.methods import EncoderCall, get_method
from flowcut.runtime.encoding import media_encoding, total_scoring_seconds
from flowcut.runtime.family import EncoderWork, Handler
from flowcut.runtime.language import decoder_pruner
from flowcut.runtime.media import Kept, MediaFamily, MediaItem, MediaKind, PassMedia
from flowcut.trace import PruningTrace


def stock_image_trace(kept_indices: torch.Tensor, layers: int, patches: int) -> ImageTrace:
    """The trace of a view the stock encoder path encoded: every layer runs on every patch."""
    return ImageTrace(kept_indices, [patches] * layers, [], [None] * layers)


@dataclass
class EncodedViews:
    """Views pruned to their budgets: per view its projected tokens and trace, in the order given."""

    features: list[torch.Tensor]
    traces: list[ImageTrace]
    scoring_seconds: float | None
    hidden_states: torch.Tensor | None
    """The encoder-side tokens where all views were one method call (one budget), else None."""


class SingleStageFamily(MediaFamily):
    """Installs FlowCut on one instance of a LLaVA-1.5-like model and removes it again (the family's images)."""

    image_tower_name: ClassVar[str]
    """Attribute of the inner model that holds the CLIP tower encoding images."""
    pooled_as_list: ClassVar[bool] = True
    """How the model's ``get_image_features`` returns the projected features: a list per image, or one tensor."""
    takes_sliced_encodings = True
    same_counts_per_item = True

    def __init__(self, model: torch.nn.Module, config: FlowCutConfig, on_trace: Callable[[PruningTrace], None]):
        super().__init__(model, on_trace)
        self.encoder = ClipEncoderAdapter(getattr(self.base, self.image_tower_name))
        patches = self.encoder.num_patches
        self.config = replace(config, keep=tokens_to_keep(config.keep, patches))
        self.method = get_method(config.method)
        feature_layer_index(model.config.vision_feature_layer, self.encoder.num_layers)
        check_select_strategy(model.config.vision_feature_select_strategy)
        self.image_token_id = model.config.image_token_id
        self.image = MediaItem(patches, self.tokens_per_image, self.tokens_per_image)
        """Every image's token counts: stock, entering the language model, after its pruning layer."""
        if self.method.stage == "language" and self.tokens_per_image < patches:
            self.image = MediaItem(patches, patches, self.tokens_per_image)
            self.pruner = decoder_pruner(
                self.base.language_model, self.method.language_layer, self.method.language_score
            )

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens per image that the language model's later layers see."""
        return self.method.tokens_per_image(self.config.keep, self.encoder.num_patches)

    def feature_layer(self, vision_feature_layer: Any) -> int:
        """The encoder layer a pass's ``vision_feature_layer`` (None: the model's) names."""
        layer = self.model.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        return feature_layer_index(layer, self.encoder.num_layers)

    def encode_views(
        self,
        encoder: ClipEncoderAdapter,
        pixels: torch.Tensor,
        budgets: list[int],
        feature_layer: int,
        stock_views: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> EncodedViews:
        """Each view of ``pixels`` pruned to its budget by the method, views of one budget in one call.

        A view whose budget is every patch is not pruned: ``stock_views(pixels)`` gives its patches'
        projected tokens (where views can have such budgets). A view's tokens depend on its pixels and
        budget alone.
        """
        patches, layers = encoder.num_patches, encoder.num_layers
        features: list[torch.Tensor | None] = [None] * len(budgets)
        traces: list[ImageTrace | None] = [None] * len(budgets)
        seconds, hidden_states = None, None
        for budget in sorted(set(budgets)):
            chosen = [view for view, view_budget in enumerate(budgets) if view_budget == budget]
            if budget == patches and stock_views is not None:
                whole = stock_views(pixels[chosen])
                for row, view in enumerate(chosen):
                    features[view] = whole[row]
                    traces[view] = stock_image_trace(torch.arange(patches), layers, patches)
                continue
            call = EncoderCall(
                replace(self.config, keep=budget),
                encoder,
                pixels[chosen],
                feature_layer,
                encoder.grid_size,
                self.base.multi_modal_projector,
            )
            with encoder.session() as bound:
                selected = self.method.run(replace(call, encoder=bound))
            for row, view in enumerate(chosen):
                features[view], traces[view] = selected.features[row], selected.images[row]
            seconds = total_scoring_seconds(seconds, selected.scoring_seconds)
            hidden_states = selected.hidden_states if len(chosen) == len(budgets) else None
        return EncodedViews(features, traces, seconds, hidden_states)  # type: ignore[arg-type]

    # -- model side -------------------------------------------------------------------------

    def entry_points(self) -> dict[str, Handler]:
        """This instance's image features go through FlowCut."""
        return {"get_image_features": self.image_features}

    def media_kinds(self) -> list[MediaKind]:
        return [MediaKind("image", self.image_token_id, "pixel_values", self._encode_images, self._planned_images)]

    def _encode_images(self, kwargs: dict[str, Any]) -> Any:
        names = ("vision_feature_layer", "vision_feature_select_strategy")
        return self.base.get_image_features(kwargs["pixel_values"], **{name: kwargs.get(name) for name in names})

    def _planned_images(self, kwargs: dict[str, Any]) -> list[MediaItem]:
        pixels = kwargs.get("pixel_values")
        return [] if pixels is None else [self.image] * pixels.shape[0]

    def image_features(
        self,
        stock: Callable[..., Any],
        pixel_values: torch.Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Any = None,
        image_sizes: Any = None,
        **kwargs: Any,
    ) -> compat.EncoderOutput | tuple:
        """FlowCut's replacement for the inner model's ``get_image_features``; a direct call is traced too."""
        feature_layer = self.feature_layer(vision_feature_layer)
        strategy = vision_feature_select_strategy
        check_select_strategy(self.model.config.vision_feature_select_strategy if strategy is None else strategy)
        if image_sizes is not None:
            raise ValueError(f"FlowCut's {self.family_name} path takes fixed-size images; image_sizes is not supported")
        items = [self.image] * pixel_values.shape[0]
        if self.image.placeholders >= self.encoder.num_patches:  # documented no-op: the stock path, bit for bit
            output = stock(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                **kwargs,
            )
            patches, layers = self.encoder.num_patches, self.encoder.num_layers
            traces = [stock_image_trace(torch.arange(patches), layers, patches) for _ in items]
            media, seconds = (items, (traces, feature_layer)), None
        else:
            budgets = [self.image.placeholders] * len(items)
            views = self.encode_views(self.encoder, pixel_values, budgets, feature_layer)
            pooled = views.features if self.pooled_as_list else torch.stack(views.features)
            output = compat.encoder_output(last_hidden_state=views.hidden_states, pooler_output=pooled)
            media, seconds = (items, (views.traces, feature_layer)), views.scoring_seconds
        if self.pruner is None:
            self.publish(PassMedia({"image": media}, seconds), None, None)
        return media_encoding(output, media, seconds)

    def publish(self, media: PassMedia, kept: Kept | None, positions: torch.Tensor | None) -> None:
        """The images' encoder traces; after a language-model prune, each image's kept tokens as patch indices."""
        traces, feature_layer = media.extra("image") or ([], self.feature_layer(None))
        masks = (kept or {}).get("image")
        if masks is not None:
            patches, layers = self.encoder.num_patches, self.encoder.num_layers
            traces = [stock_image_trace(mask.nonzero().squeeze(1).cpu(), layers, patches) for mask in masks]
        trace = PruningTrace(traces, self.encoder.grid_size, self.tokens_per_image, feature_layer, positions)
        if media.scoring_seconds is not None:
            trace.scoring_ms = 1000 * media.scoring_seconds
        self.on_trace(trace)

    @classmethod
    def encoder_work(cls, model: torch.nn.Module, trace: PruningTrace | None, inputs: Any) -> EncoderWork | None:
        return frames_encoder_work(model, trace, inputs)

    # -- processor side ---------------------------------------------------------------------

    def processor_image(self, stock_count: int, image_size: tuple[int, int] | None) -> MediaItem:
        return self.image
