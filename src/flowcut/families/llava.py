"""LLaVA-1.5 family adapter (``LlavaForConditionalGeneration`` with a CLIP vision tower).

FlowCut enters through the instance's ``get_image_features`` (used by both ``forward`` and
``generate``): it runs the CLIP tower only up to the feature layer with the encoder stage, projects
the ``keep`` surviving patches and hands them to the unchanged language model. The processor side
shrinks each image's placeholder run to ``keep`` tokens, so the model's own image-token count check
stays on and passes. Language-stage methods (FastV) hand every patch over and prune after a decoder layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

from flowcut import compat
from flowcut.config import FlowCutConfig, tokens_to_keep
from flowcut.core.encoder_stage import ImageTrace
from flowcut.families.clip import (
    ClipEncoderAdapter,
    check_select_strategy,
    feature_layer_index,
    frames_encoder_work,
)
from flowcut.methods import EncoderCall, get_method
from flowcut.runtime.encoding import media_encoding
from flowcut.runtime.family import EncoderWork, Handler
from flowcut.runtime.language import decoder_pruner
from flowcut.runtime.media import Kept, MediaFamily, MediaItem, MediaKind, PassMedia
from flowcut.runtime.processor import adapt_processor
from flowcut.trace import PruningTrace


def stock_image_trace(kept_indices: torch.Tensor, layers: int, patches: int) -> ImageTrace:
    """The trace of an image the stock encoder path encoded: every layer runs on every patch."""
    return ImageTrace(kept_indices, [patches] * layers, [], [None] * layers)


class LlavaFamily(MediaFamily):
    """Installs FlowCut on one ``LlavaForConditionalGeneration`` instance and removes it again."""

    model_classes: tuple[type, ...] = (LlavaForConditionalGeneration,)
    image_tower_name = "vision_tower"
    """Attribute of the inner model that holds the CLIP tower encoding images."""
    family_name = "LLaVA"
    pooled_as_list = True
    """How the model's ``get_image_features`` returns the projected features: a list per image, or one tensor."""
    takes_sliced_encodings = True
    same_counts_per_item = True

    def __init__(
        self, model: LlavaForConditionalGeneration, config: FlowCutConfig, on_trace: Callable[[PruningTrace], None]
    ):
        super().__init__(model, on_trace)
        self.encoder = ClipEncoderAdapter(getattr(self.base, self.image_tower_name))
        # Every image has the same patch count, so a ratio is one token budget for all of them.
        self.config = replace(config, keep=tokens_to_keep(config.keep, self.encoder.num_patches))
        self.method = get_method(config.method)
        feature_layer_index(model.config.vision_feature_layer, self.encoder.num_layers)
        check_select_strategy(model.config.vision_feature_select_strategy)
        self.image_token_id = model.config.image_token_id
        patches = self.encoder.num_patches
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
        """FlowCut's replacement for ``LlavaModel.get_image_features``; a direct call is traced too."""
        feature_layer = self.feature_layer(vision_feature_layer)
        strategy = vision_feature_select_strategy
        check_select_strategy(self.model.config.vision_feature_select_strategy if strategy is None else strategy)
        if image_sizes is not None:
            raise ValueError("FlowCut's LLaVA-1.5 path takes fixed-size images; image_sizes is not supported")
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
            call = EncoderCall(
                self.config,
                self.encoder,
                pixel_values,
                feature_layer,
                self.encoder.grid_size,
                self.base.multi_modal_projector,
            )
            with self.encoder.session() as encoder:
                selected = self.method.run(replace(call, encoder=encoder))
            pooled = list(selected.features) if self.pooled_as_list else selected.features
            output = compat.encoder_output(last_hidden_state=selected.hidden_states, pooler_output=pooled)
            media, seconds = (items, (selected.images, feature_layer)), selected.scoring_seconds
        if self.pruner is None:
            self.publish(PassMedia({"image": media}, seconds), None, None)
        if not kwargs.get("return_dict", True):
            return output.to_tuple()
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

    def patch_processor(self, processor: Any) -> None:
        """Make ``processor`` emit ``keep`` image placeholders per image (instance-level, reversible)."""
        adapt_processor(processor, self.patch, self.image_token_id, self.family_name, self._image_placeholders)

    def _image_placeholders(self, stock_count: int, image_size: Any) -> int:
        """Image placeholders for an image the processor would give ``stock_count``."""
        if stock_count != self.image.stock_tokens:
            raise ValueError(
                f"the processor makes {stock_count} image tokens per image but the vision tower has "
                f"{self.image.stock_tokens} patches: processor and model do not match"
            )
        return self.image.placeholders
