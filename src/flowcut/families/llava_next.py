"""LLaVA-NeXT family adapter (``LlavaNextForConditionalGeneration``: anyres crops of a CLIP tower).

Two stages, as SPEC §4 defines them. An image is a base view plus a grid of crops; unpruned, the
language model sees the base view's patches, then the grid's patches laid out as one big image,
unpadded (the rows or columns that only cover the letterbox padding are removed), with an
image-newline token after every row. With a budget of ``T`` tokens per image:

1. Encoder stage (``method="flowcut"``): the shared progressive stage prunes every crop on its own
   (base view included) to ``T // 2`` patches. Patches that unpadding would remove are *ineligible*:
   they take part in attention and in the schedule but are always dropped first, so every kept
   patch reaches the language model and the count is known before the image is encoded (the
   processor writes it, the model's own placeholder check stays on). The kept patches are put back
   in their spatial order: the base view's, then the grid's row by row over the whole unpadded
   grid. Image-newline tokens are dropped, as in the authors' code (the kept patches no longer form
   rows).
2. Language-model stage: after decoder layer 1 each image keeps its best ``T`` visual tokens by the
   last prompt token's FlowCut score (SPEC §3); ``method="fastv"`` skips stage 1 and ranks all the
   stock tokens (newlines included) by attention.

Where stage 1 would keep every patch of a crop (``T // 2`` at least the patches of a crop), the
image takes the stock path (with its newlines) and only stage 2 prunes. ``keep`` at or above an
image's stock token count leaves it untouched.

The other encoder methods (VisionZip, DivPrune, pool, random) keep ``T`` in stage 1 and skip stage 2
(:func:`flowcut.methods.stages`): each crop keeps its share of ``T`` by its eligible patches
(:func:`flowcut.config.unit_shares`), each video frame its share of the video's ``T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import (
    LlavaNextForConditionalGeneration,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

from flowcut import compat
from flowcut.config import FlowCutConfig, frame_budgets, unit_shares
from flowcut.core.encoder_stage import EncoderStageOutput
from flowcut.families.clip import (
    check_select_strategy,
    feature_layer_index,
    frames_encoder_work,
    vision_adapter,
    vit_encoder_work,
)
from flowcut.methods import UnitCall
from flowcut.runtime.encoding import media_encoding
from flowcut.runtime.family import EncoderWork, Handler
from flowcut.runtime.media import Kept, MediaKind, PassMedia, TwoStageFamily
from flowcut.trace import PruningTrace


@dataclass
class ImageLayout:
    """Where one image's tokens come from, and what the budget makes of them."""

    crop_grid: tuple[int, int]
    """Grid crops (rows, columns) besides the base view."""
    stock_tokens: int
    """Visual tokens of the unpruned model: base view + unpadded grid + one newline per grid row."""
    eligible: list[torch.Tensor]
    """Per grid crop, the ``(patches,)`` mask of its patches that survive unpadding."""
    grid_index: list[torch.Tensor]
    """Per grid crop, each patch's row-major index in the whole grid (its spatial order)."""
    budget: int
    """``T``: the image's visual tokens in the decoder layers after the pruning layer."""
    crop_keeps: list[int] | None
    """Encoder stage: patches kept per crop (base view first); None where the image takes the stock path."""

    @property
    def placeholders(self) -> int:
        """Visual tokens entering the language model."""
        return self.stock_tokens if self.crop_keeps is None else sum(self.crop_keeps)


@dataclass
class VideoLayout:
    """A video's tokens: stock (pooled frames), and what the budget makes of them."""

    frames: int
    stock_tokens: int
    """Visual tokens of the unpruned model: every frame pooled, plus LLaVA-OneVision's one newline."""
    budget: int
    """``T``: the video's visual tokens in the decoder layers after the pruning layer."""
    frame_keeps: list[int] | None
    """Encoder stage: patches kept per frame; None where the video takes the stock (pooled) path."""

    @property
    def placeholders(self) -> int:
        """Visual tokens entering the language model."""
        return self.stock_tokens if self.frame_keeps is None else sum(self.frame_keeps)


class LlavaNextFamily(TwoStageFamily):
    """Installs FlowCut on one ``LlavaNextForConditionalGeneration`` instance and removes it again."""

    model_classes: tuple[type, ...] = (LlavaNextForConditionalGeneration, LlavaNextVideoForConditionalGeneration)
    family_name = "LLaVA-NeXT"
    video_newlines = 0
    """Newline tokens the stock model appends to a video (LLaVA-OneVision: one)."""

    def __init__(self, model: torch.nn.Module, config: FlowCutConfig, on_trace: Callable[[PruningTrace], None]):
        super().__init__(model, config, on_trace)
        self.encoder = vision_adapter(self.base.vision_tower)
        model_config = model.config
        self.feature_layer = feature_layer_index(model_config.vision_feature_layer, self.encoder.num_layers)
        if self.encoder.query_slots:
            check_select_strategy(model_config.vision_feature_select_strategy)
        elif model_config.vision_feature_select_strategy != "full":
            raise ValueError(
                "a vision tower without CLS hands every patch to the language model: "
                f"vision_feature_select_strategy must be 'full', got {model_config.vision_feature_select_strategy!r}"
            )
        self.image_token_id = model_config.image_token_id
        self.video_token_id = getattr(model_config, "video_token_id", None)
        self.pinpoints = model_config.image_grid_pinpoints
        self.crop_pixels = model_config.vision_config.image_size

    # -- layouts and budgets --------------------------------------------------------------------

    max_crops: int | None = None
    """Where the stock model shrinks large grids (LLaVA-OneVision's ``anyres_max_N``): N crops' worth of patches."""

    def layout(self, image_size: Any, single_crop: bool = False) -> ImageLayout:
        """The token layout and budgets of an image of ``image_size`` (height, width).

        ``single_crop``: the image is encoded as its base view alone (LLaVA-OneVision's multi-image prompts).
        """
        side = self.encoder.grid_size[0]
        patches = side * side
        if single_crop:
            stock = patches + 1  # the base view and one image-newline token
            budget = self.budget(stock)
            crop_keeps = [budget] if self.stages.encoder and budget < patches else None
            return ImageLayout((0, 0), stock, [], [], budget, crop_keeps)
        size = [int(side) for side in (image_size.tolist() if hasattr(image_size, "tolist") else image_size)]
        rows, columns = compat.anyres_grid_shape(size, self.pinpoints, self.crop_pixels)
        grid = torch.arange(rows * side * columns * side).view(1, rows * side, columns * side)
        survivors = compat.unpad_image(grid, size)
        unpadded_rows, unpadded_columns = survivors.shape[1:]
        kept_cells = torch.zeros(grid.numel(), dtype=torch.bool)
        kept_cells[survivors.flatten()] = True
        eligible, grid_index = [], []
        for crop in range(rows * columns):
            crop_row, crop_column = divmod(crop, columns)
            patch_rows = torch.arange(side).repeat_interleave(side)
            patch_columns = torch.arange(side).repeat(side)
            index = (crop_row * side + patch_rows) * (columns * side) + crop_column * side + patch_columns
            grid_index.append(index)
            eligible.append(kept_cells[index])
        stock_rows, stock_columns = unpadded_rows, unpadded_columns
        if self.max_crops is not None:  # the stock model interpolates a grid this large down
            ratio = math.sqrt(unpadded_rows * unpadded_columns / (self.max_crops * patches))
            if ratio > 1.1:
                stock_rows, stock_columns = int(unpadded_rows // ratio), int(unpadded_columns // ratio)
        stock = patches + stock_rows * stock_columns + stock_rows
        budget = self.budget(stock)
        crop_keeps = None
        sizes = [patches] + [int(mask.sum()) for mask in eligible]
        if self.stages.encoder_keeps_budget and budget < stock:
            crop_keeps = unit_shares(budget, sizes)
        elif self.stages.encoder and budget < stock and budget // 2 < patches:
            half = max(1, budget // 2)
            crop_keeps = [min(half, size) for size in sizes]
        return ImageLayout((rows, columns), stock, eligible, grid_index, budget, crop_keeps)

    def pooled_side(self, side: int) -> int:
        """Rows (and columns) of a video frame's pooled grid in the stock model (LLaVA-NeXT-Video: average pooling)."""
        return side // self.model.config.spatial_pool_stride

    def video_layout(self, frames: int) -> VideoLayout:
        """The token layout and budgets of a video of ``frames`` frames.

        ``keep`` counts the whole video's tokens. With FlowCut, the encoder stage keeps twice each
        frame's share of ``T`` (:func:`flowcut.config.frame_budgets`), as it keeps ``2T`` of an image,
        and hands the kept patches over unpooled (pooling needs the whole grid); the language-model
        stage then keeps the video's best ``T``. Where ``2T`` is not below the stock count the video
        takes the stock (pooled) path and only the language-model stage prunes. The other encoder
        methods keep each frame's share itself, and the video takes the stock path only at ``T`` ≥ stock.
        """
        side = self.encoder.grid_size[0]
        stock = frames * self.pooled_side(side) ** 2 + self.video_newlines
        budget = self.budget(stock)
        frame_keeps = None
        patches = side * side
        factor = 2 if self.stages.language else 1  # FlowCut keeps 2T for the language-model stage to finish
        if self.stages.encoder and factor * budget < stock:
            frame_keeps = [min(patches, factor * share) for share in frame_budgets(budget, frames, patches)]
        return VideoLayout(frames, stock, budget, frame_keeps)

    # -- model side -------------------------------------------------------------------------

    def entry_points(self) -> dict[str, Handler]:
        """This instance's image (and video) features go through FlowCut."""
        entries = {"get_image_features": self.image_features}
        if self.video_token_id is not None:
            entries["get_video_features"] = self.video_features
        return entries

    def image_features(
        self, stock: Callable[..., Any], pixel_values: torch.Tensor, image_sizes: torch.Tensor, **kwargs: Any
    ) -> Any:
        """FlowCut's replacement for ``get_image_features`` (LLaVA-NeXT and LLaVA-OneVision)."""
        self._check_settings(kwargs)
        single = self._single_crop(kwargs.get("batch_num_images"), len(image_sizes))
        layouts = [self.layout(size, alone) for size, alone in zip(image_sizes, single, strict=True)]
        stock_kwargs = {key: value for key, value in kwargs.items() if value is not None}
        pruned = [i for i, lay in enumerate(layouts) if lay.crop_keeps is not None]
        features: list[torch.Tensor | None] = [None] * len(layouts)
        if len(pruned) < len(layouts):
            # Images the encoder stage leaves whole take the stock path (newlines included), bit for bit.
            output = stock(pixel_values, image_sizes, **stock_kwargs)
            if not pruned:
                return media_encoding(output, (layouts, None))
            features = list(output.pooler_output)
        crops_per_image = [
            1 if alone else compat.anyres_crop_count(size, self.pinpoints, self.crop_pixels)
            for size, alone in zip(image_sizes.tolist(), single, strict=True)
        ]
        if pixel_values.dim() == 5:
            crops = [image[:count] for image, count in zip(pixel_values, crops_per_image, strict=True)]
        else:
            crops = list(pixel_values.split(crops_per_image))
        features_pruned, stage = self._prune_images([crops[i] for i in pruned], [layouts[i] for i in pruned])
        for i, feature in zip(pruned, features_pruned, strict=True):
            features[i] = feature
        output = compat.encoder_output(pooler_output=features)
        return media_encoding(output, (layouts, stage.images), stage.scoring_seconds)

    def _check_settings(self, kwargs: dict[str, Any]) -> None:
        for name in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"):
            if kwargs.get(name) is not None and kwargs[name] != getattr(self.model.config, name):
                raise ValueError(f"FlowCut's anyres path uses the model's {name}; got {kwargs[name]!r}")

    def video_features(self, stock: Callable[..., Any], pixel_values_videos: torch.Tensor, **kwargs: Any) -> Any:
        """FlowCut's replacement for ``get_video_features``: each frame's kept patches, unpooled.

        See :meth:`video_layout`; a video at or under its encoder budget takes the stock path.
        """
        self._check_settings(kwargs)
        videos, frames = pixel_values_videos.shape[:2]
        layout = self.video_layout(frames)
        if layout.frame_keeps is None:
            output = stock(pixel_values_videos, **{key: value for key, value in kwargs.items() if value is not None})
            return media_encoding(output, ([layout] * videos, None))
        keeps = layout.frame_keeps * videos
        frames_pixels = pixel_values_videos.flatten(0, 1)
        projector = self.base.multi_modal_projector
        call = UnitCall(self.config, self.encoder, frames_pixels, self.feature_layer, keeps, project=projector)
        with self.encoder.session() as encoder:
            stage = self.method.select_units(replace(call, encoder=encoder))
        projected = self.base.multi_modal_projector(stage.hidden_states[:, self.encoder.query_slots :])
        tokens = [projected[row, :count] for row, count in enumerate(stage.counts)]
        features = torch.stack([torch.cat(tokens[video * frames : (video + 1) * frames]) for video in range(videos)])
        frame_traces = [stage.images[video * frames : (video + 1) * frames] for video in range(videos)]
        output = compat.encoder_output(pooler_output=features)
        return media_encoding(output, ([layout] * videos, frame_traces), stage.scoring_seconds)

    @staticmethod
    def _single_crop(batch_num_images: Any, count: int) -> list[bool]:
        """Per image, whether it is encoded as its base view alone (the images of multi-image prompts)."""
        if batch_num_images is None:
            return [False] * count
        return [int(n) > 1 for n in batch_num_images for _ in range(int(n))]

    def _prune_images(
        self, crops: list[torch.Tensor], layouts: list[ImageLayout]
    ) -> tuple[list[torch.Tensor], EncoderStageOutput]:
        """Run the encoder stage over every crop of the given images at once; each image's tokens, and the stage."""
        batch, keeps, eligible, owners = [], [], [], []
        for image, (image_crops, lay) in enumerate(zip(crops, layouts, strict=True)):
            masks = [None, *lay.eligible]
            for crop, (pixels, keep, mask) in enumerate(zip(image_crops, lay.crop_keeps, masks, strict=True)):
                if keep == 0:
                    continue  # a crop that lies wholly in the letterbox padding contributes nothing
                batch.append(pixels)
                keeps.append(keep)
                eligible.append(mask)
                owners.append((image, crop))
        call = UnitCall(
            self.config,
            self.encoder,
            torch.stack(batch),
            self.feature_layer,
            keeps,
            eligible=eligible,
            project=self.base.multi_modal_projector,
        )
        with self.encoder.session() as encoder:
            stage = self.method.select_units(replace(call, encoder=encoder))
        projected = self.base.multi_modal_projector(stage.hidden_states[:, self.encoder.query_slots :])
        parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layouts]
        base_patches = self.encoder.num_patches
        for row, ((image, crop), trace) in enumerate(zip(owners, stage.images, strict=True)):
            count = stage.counts[row]
            if crop == 0:
                order = trace.kept_indices
            else:  # after every base-view patch, at its place in the whole grid
                order = base_patches + layouts[image].grid_index[crop - 1][trace.kept_indices]
            parts[image].append((order, projected[row, :count]))
        features = []
        for image_parts in parts:
            # Base view first, then the grid's kept patches in row-major order over the whole grid.
            order = torch.cat([position for position, _ in image_parts])
            tokens = torch.cat([token for _, token in image_parts])
            features.append(tokens[order.argsort().to(tokens.device)])
        return features, stage

    def media_kinds(self) -> list[MediaKind]:
        kinds = [MediaKind("image", self.image_token_id, "pixel_values", self._encode_images, self._planned_images)]
        if self.video_token_id is not None:
            kinds.append(
                MediaKind(
                    "video", self.video_token_id, "pixel_values_videos", self._encode_videos, self._planned_videos
                )
            )
        return kinds

    @staticmethod
    def _settings(kwargs: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        """The model's own vision settings a pass sets (FlowCut refuses values other than the config's)."""
        return {name: kwargs[name] for name in names if kwargs.get(name) is not None}

    def _encode_images(self, kwargs: dict[str, Any]) -> Any:
        sizes = kwargs.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (the processor returns them)")
        names = ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio")
        return self.base.get_image_features(
            kwargs["pixel_values"],
            sizes,
            batch_num_images=kwargs.get("batch_num_images"),
            **self._settings(kwargs, names),
        )

    def _encode_videos(self, kwargs: dict[str, Any]) -> Any:
        names = ("vision_feature_layer", "vision_feature_select_strategy")
        return self.base.get_video_features(kwargs["pixel_values_videos"], **self._settings(kwargs, names))

    def _planned_images(self, kwargs: dict[str, Any]) -> list[ImageLayout]:
        sizes = kwargs.get("image_sizes")
        if kwargs.get("pixel_values") is None or sizes is None:
            return []
        single = self._single_crop(kwargs.get("batch_num_images"), len(sizes))
        return [self.layout(size, alone) for size, alone in zip(sizes, single, strict=True)]

    def _planned_videos(self, kwargs: dict[str, Any]) -> list[VideoLayout]:
        videos = kwargs.get("pixel_values_videos")
        return [] if videos is None else [self.video_layout(videos.shape[1])] * videos.shape[0]

    def publish(self, media: PassMedia, kept: Kept | None, positions: torch.Tensor | None) -> None:
        """Per image and video: its stock visual tokens, those entering the language model, those kept after layer 1."""

        def tokens(kind: str) -> list[tuple[int, int, int]]:
            masks = (kept or {}).get(kind) or [None] * len(media.items(kind))
            return [
                (lay.stock_tokens, lay.placeholders, lay.placeholders if mask is None else int(mask.sum()))
                for lay, mask in zip(media.items(kind), masks, strict=True)
            ]

        seconds = media.scoring_seconds
        trace = PruningTrace(
            media.extra("image") or [],
            self.encoder.grid_size,
            self.config.keep,
            self.feature_layer,
            positions,
            image_tokens=tokens("image"),
            scoring_ms=None if seconds is None else 1000 * seconds,
        )
        if media.items("video"):
            trace.videos = media.extra("video")
            trace.video_keep = self.config.keep
            trace.video_tokens = tokens("video")
        self.on_trace(trace)

    @classmethod
    def encoder_work(cls, model: torch.nn.Module, trace: PruningTrace | None, inputs: Any) -> EncoderWork | None:
        """An image as its anyres crops (every crop an encoder pass), a video frame by frame."""
        if inputs.get("pixel_values_videos") is not None:
            return frames_encoder_work(model, trace, inputs)
        size = inputs["image_sizes"][0].tolist()
        crops = compat.anyres_crop_count(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
        return vit_encoder_work(model, trace.images if trace is not None else [], crops, crops=True)

    # -- processor side ---------------------------------------------------------------------

    def processor_image(self, stock_count: int, image_size: tuple[int, int] | None) -> ImageLayout:
        if image_size is None:
            raise ValueError("the processor did not report the image size")
        return self.layout(image_size)

    def processor_video(self, video_inputs: dict, index: int) -> VideoLayout:
        return self.video_layout(len(video_inputs["pixel_values_videos"][index]))


class LlavaOnevisionFamily(LlavaNextFamily):
    """LLaVA-OneVision: the same two stages on a SigLIP tower (no CLS: the global token scores the patches).

    Its stock packing shrinks grids larger than ``anyres_max_N`` by interpolation; when the encoder
    stage prunes, the kept patches are handed over as they are (there is nothing to interpolate
    between), so only a ratio budget refers to the interpolated stock count. The images of
    multi-image prompts are encoded as one base view each and pruned to the budget there.
    """

    model_classes = (LlavaOnevisionForConditionalGeneration,)
    family_name = "LLaVA-OneVision"

    def __init__(self, model: torch.nn.Module, config: FlowCutConfig, on_trace: Callable[[PruningTrace], None]):
        super().__init__(model, config, on_trace)
        aspect = model.config.vision_aspect_ratio
        if not (isinstance(aspect, str) and aspect.startswith("anyres_max_")):
            raise ValueError(f"FlowCut supports LLaVA-OneVision's anyres_max_N packing, got {aspect!r}")
        self.max_crops = int(aspect.removeprefix("anyres_max_"))

    video_newlines = 1

    @classmethod
    def encoder_work(cls, model: torch.nn.Module, trace: PruningTrace | None, inputs: Any) -> EncoderWork | None:
        return None  # the analytic FLOP count does not cover anyres_max_N's interpolation yet

    def pooled_side(self, side: int) -> int:
        """LLaVA-OneVision halves each frame's grid by bilinear interpolation, rounding up."""
        return math.ceil(side / 2)

    def processor_image(self, stock_count: int, image_size: tuple[int, int] | None) -> ImageLayout:
        """A stock count of one base view and a newline marks an image of a multi-image prompt."""
        if stock_count == self.encoder.num_patches + 1:
            return self.layout(image_size, single_crop=True)
        return super().processor_image(stock_count, image_size)
