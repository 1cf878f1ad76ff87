"""LLaVA-1.5 family adapter (``LlavaForConditionalGeneration`` with a CLIP vision tower).

FlowCut enters through the instance's ``get_image_features`` (used by both ``forward`` and
``generate``): it runs the CLIP tower only up to the feature layer with the encoder stage, projects
the ``keep`` surviving patches and hands them to the unchanged language model. The processor side
shrinks each image's placeholder run to ``keep`` tokens, so the model's own image-token count check
stays on and passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

from flowcut import compat
from flowcut.adapters.clip import ClipEncoderAdapter
from flowcut.adapters.language import DecoderPruner, LanguagePrefill, decoder_pruner, images_key, prompt_layout
from flowcut.adapters.processor import adapt_processor, check_placeholder_count
from flowcut.config import FlowCutConfig, tokens_to_keep
from flowcut.core.encoder_stage import ImageTrace
from flowcut.core.language_stage import uniform_budgets
from flowcut.methods import EncoderCall, get_method
from flowcut.runtime import InstancePatch
from flowcut.runtime.encoding import media_encoding
from flowcut.trace import PruningTrace


def feature_layer_index(vision_feature_layer: Any, num_layers: int) -> int:
    """0-based index of the encoder layer whose output ``hidden_states[vision_feature_layer]`` is."""
    if not isinstance(vision_feature_layer, int) or isinstance(vision_feature_layer, bool):
        raise ValueError(
            "FlowCut needs a single vision feature layer; vision_feature_layer="
            f"{vision_feature_layer!r} (features from several layers) is not supported"
        )
    entries = num_layers + 1  # hidden_states = (embeddings, layer 0, …, layer L-1)
    if not -entries <= vision_feature_layer < entries:
        raise ValueError(f"vision_feature_layer={vision_feature_layer} is out of range for {num_layers} layers")
    index = vision_feature_layer % entries - 1
    if index < 1:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} leaves no encoder layer before the features to prune in"
        )
    return index


def check_select_strategy(strategy: Any) -> None:
    """FlowCut drops CLS from the features ("default"); "full" would hand CLS to the language model."""
    if strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r} is not supported by FlowCut: only 'default' "
            "(patch tokens without CLS, as in LLaVA-1.5) keeps an exact budget of patch tokens"
        )


class LlavaFamily:
    """Installs FlowCut on one ``LlavaForConditionalGeneration`` instance and removes it again."""

    model_classes: tuple[type, ...] = (LlavaForConditionalGeneration,)
    image_tower_name = "vision_tower"
    family_name = "LLaVA"
    pooled_as_list = True
    """How the model's ``get_image_features`` returns the projected features: a list per image, or one tensor."""
    """Attribute of the inner model that holds the CLIP tower encoding images."""

    def __init__(
        self, model: LlavaForConditionalGeneration, config: FlowCutConfig, on_trace: Callable[[PruningTrace], None]
    ):
        self.model = model
        self.on_trace = on_trace
        self.base = model.model
        self.encoder = ClipEncoderAdapter(getattr(self.base, self.image_tower_name))
        # Every image has the same patch count, so a ratio is one token budget for all of them.
        self.config = replace(config, keep=tokens_to_keep(config.keep, self.encoder.num_patches))
        model_config = model.config
        self.method = get_method(config.method)
        self.default_feature_layer = feature_layer_index(model_config.vision_feature_layer, self.encoder.num_layers)
        check_select_strategy(model_config.vision_feature_select_strategy)
        self.image_token_id = model_config.image_token_id
        self.patch = InstancePatch()
        self.pruner: DecoderPruner | None = None
        if self.method.stage == "language" and self.tokens_per_image < self.encoder.num_patches:
            self.pruner = decoder_pruner(
                self.base.language_model, self.method.language_layer, self.method.language_score
            )

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens per image that the language model's later layers see."""
        return self.method.tokens_per_image(self.config.keep, self.encoder.num_patches)

    @property
    def input_tokens_per_image(self) -> int:
        """Visual tokens per image entering the language model (all of them for language-stage methods)."""
        return self.encoder.num_patches if self.method.stage == "language" else self.tokens_per_image

    @property
    def stock_tokens_per_image(self) -> int:
        """Visual tokens per image of the unpruned model."""
        return self.encoder.num_patches

    # -- model side -------------------------------------------------------------------------

    def install(self) -> None:
        """Route this instance's image features through FlowCut."""
        family = self

        def wrap(stock: Callable[..., Any]) -> Callable[..., Any]:
            def get_image_features(
                pixel_values: torch.Tensor,
                vision_feature_layer: int | list[int] | None = None,
                vision_feature_select_strategy: str | None = None,
                image_sizes: torch.Tensor | None = None,
                **kwargs: Any,
            ) -> compat.EncoderOutput | tuple:
                """Image features pruned by FlowCut (installed by flowcut.apply on this instance)."""
                return family.image_features(
                    stock, pixel_values, vision_feature_layer, vision_feature_select_strategy, image_sizes, **kwargs
                )

            return get_image_features

        self.patch.override(self.base, "get_image_features", wrap)
        self.patch.hook(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        if self.pruner is not None:
            self.pruner.install()

    def uninstall(self) -> None:
        """Restore the instance exactly as it was before :meth:`install`."""
        self.patch.restore()
        if self.pruner is not None:
            self.pruner.remove()

    def image_features(
        self,
        stock: Callable[..., Any],
        pixel_values: torch.Tensor,
        vision_feature_layer: Any,
        vision_feature_select_strategy: Any,
        image_sizes: Any,
        **kwargs: Any,
    ) -> compat.EncoderOutput | tuple:
        """FlowCut's replacement for ``LlavaModel.get_image_features``."""
        model_config = self.model.config
        layer = model_config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = (
            model_config.vision_feature_select_strategy
            if vision_feature_select_strategy is None
            else vision_feature_select_strategy
        )
        feature_layer = feature_layer_index(layer, self.encoder.num_layers)
        check_select_strategy(strategy)
        if image_sizes is not None:
            raise ValueError("FlowCut's LLaVA-1.5 path takes fixed-size images; image_sizes is not supported")
        batch_size = pixel_values.shape[0]

        if self.input_tokens_per_image >= self.encoder.num_patches:
            # Documented no-op: the stock path, bit for bit.
            output = stock(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                **kwargs,
            )
            images = [self._stock_image_trace(torch.arange(self.encoder.num_patches)) for _ in range(batch_size)]
            if self.pruner is None:
                self.on_trace(PruningTrace(images, self.encoder.grid_size, self.tokens_per_image, feature_layer))
            return media_encoding(output, (images, None))

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
        trace = PruningTrace(selected.images, self.encoder.grid_size, self.tokens_per_image, feature_layer)
        if selected.scoring_seconds is not None:
            trace.scoring_ms = 1000 * selected.scoring_seconds
        self.on_trace(trace)
        pooled = list(selected.features) if self.pooled_as_list else selected.features
        output = compat.encoder_output(last_hidden_state=selected.hidden_states, pooler_output=pooled)
        if not kwargs.get("return_dict", True):
            return output.to_tuple()
        return media_encoding(output, (selected.images, None), selected.scoring_seconds)

    def _stock_image_trace(self, kept_indices: torch.Tensor) -> ImageTrace:
        """The trace of an image the stock encoder path encoded: every layer runs on every patch."""
        layers, patches = self.encoder.num_layers, self.encoder.num_patches
        return ImageTrace(kept_indices, [patches] * layers, [], [None] * layers)

    def _language_trace(self, feature_layer: int, positions: torch.Tensor, kept: list[torch.Tensor]) -> None:
        """Trace of a language-model prune: each image's kept visual tokens as patch indices."""
        images = [self._stock_image_trace(mask.nonzero().squeeze(1).cpu()) for mask in kept]
        trace = PruningTrace(images, self.encoder.grid_size, self.tokens_per_image, feature_layer, positions)
        self.on_trace(trace)

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Check the placeholders; tell the language-model pruner about a fresh prompt."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self.pruner is not None:
            cache = compat.cache_argument(kwargs)
            self.pruner.refuse_static_cache(cache, self.config.method)
            if compat.cache_length(cache) == 0:
                if input_ids is None:
                    raise ValueError(f"method {self.config.method!r} needs input_ids to find the image tokens")
                layout = prompt_layout(input_ids, kwargs.get("attention_mask"), self.image_token_id, images_key(kwargs))
                patches, keep = self.encoder.num_patches, self.tokens_per_image
                layer = kwargs.get("vision_feature_layer")
                layer = self.model.config.vision_feature_layer if layer is None else layer
                report = partial(self._language_trace, feature_layer_index(layer, self.encoder.num_layers))
                prefill = LanguagePrefill(layout, lambda visual: uniform_budgets(visual, patches, keep), report)
                self.pruner.start_prefill(prefill if layout.visual.any() else None)
        self._check_placeholders(input_ids, kwargs)

    def _check_placeholders(self, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> None:
        """Explain a placeholder count that was made for the unpruned model before the model's own check fails."""
        if input_ids is None:
            return
        num_images = None
        pixel_values = kwargs.get("pixel_values")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if pixel_values is not None:
            num_images = pixel_values.shape[0]
        elif encoded is not None and encoded.pooler_output is not None:
            num_images = len(encoded.pooler_output)
        if not num_images:
            return
        placeholders = int((input_ids == self.image_token_id).sum())
        expected, stock = num_images * self.input_tokens_per_image, num_images * self.stock_tokens_per_image
        check_placeholder_count(placeholders, expected, stock, images=num_images)

    # -- processor side ---------------------------------------------------------------------

    def patch_processor(self, processor: Any) -> None:
        """Make ``processor`` emit ``keep`` image placeholders per image (instance-level, reversible)."""
        adapt_processor(processor, self.patch, self.image_token_id, self.family_name, self._image_placeholders)

    def _image_placeholders(self, stock_count: int, image_size: Any) -> int:
        """Image placeholders for an image the processor would give ``stock_count``."""
        if stock_count != self.stock_tokens_per_image:
            raise ValueError(
                f"the processor makes {stock_count} image tokens per image but the vision tower has "
                f"{self.stock_tokens_per_image} patches: processor and model do not match"
            )
        return self.input_tokens_per_image
