"""Video-LLaVA adapter (``VideoLlavaForConditionalGeneration``): images as in LLaVA-1.5, videos frame by frame.

Images go through the image tower exactly as LLaVA-1.5's do (:class:`LlavaFamily`). A video's frames
go through the video tower, each frame pruned by the same encoder-stage method to its share of the
video's budget: for videos, ``keep`` counts the visual tokens of the whole video, split over its
frames by :func:`flowcut.config.frame_budgets` (a ratio is a share of the video's patches).

The stock model hands each frame's CLS token to the language model along with its patches (8 × 257 =
2,056 tokens for 8 frames of 224 px). A pruned frame hands over only its kept patches, as the paper's
8 × 256 = 2,048 count does, so ``keep=256`` gives the paper's 32 tokens per frame. A ``keep`` at or
above the stock count runs the stock path, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from transformers import VideoLlavaForConditionalGeneration

from flowcut import compat
from flowcut.adapters.clip import ClipEncoderAdapter
from flowcut.adapters.llava import LlavaFamily, feature_layer_index
from flowcut.adapters.processor import adapt_processor, check_placeholder_count
from flowcut.config import FlowCutConfig, frame_budgets, tokens_to_keep
from flowcut.core.encoder_stage import ImageTrace
from flowcut.methods import EncoderCall
from flowcut.runtime.encoding import MediaEncoding, encoding_scoring, media_encoding, total_scoring_seconds
from flowcut.trace import PruningTrace


class VideoLlavaFamily(LlavaFamily):
    """Installs FlowCut on one ``VideoLlavaForConditionalGeneration`` instance: its images and its videos."""

    model_classes = (VideoLlavaForConditionalGeneration,)
    image_tower_name = "image_tower"
    family_name = "Video-LLaVA"
    pooled_as_list = False

    def __init__(
        self, model: VideoLlavaForConditionalGeneration, config: FlowCutConfig, on_trace: Callable[[PruningTrace], None]
    ):
        super().__init__(model, config, on_trace)
        self.video_keep = config.keep  # LlavaFamily turned a ratio into a per-image count; videos need the ratio
        self.video_encoder = ClipEncoderAdapter(self.base.video_tower)
        self.video_token_id = model.config.video_token_id

    # -- budgets ------------------------------------------------------------------------------

    def stock_video_tokens(self, frames: int) -> int:
        """Visual tokens of a video of ``frames`` frames in the stock model: CLS and patches of every frame."""
        return frames * (self.video_encoder.num_patches + 1)

    def video_tokens(self, frames: int) -> int:
        """Visual tokens of a video of ``frames`` frames that reach the language model."""
        stock = self.stock_video_tokens(frames)
        if not self.method.prunes or self.method.stage == "language":
            return stock
        patches = frames * self.video_encoder.num_patches
        if isinstance(self.video_keep, float):
            budget = tokens_to_keep(self.video_keep, patches)
            return sum(frame_budgets(budget, frames, self.video_encoder.num_patches, requested=self.video_keep))
        if self.video_keep >= stock:
            return stock
        return sum(frame_budgets(min(self.video_keep, patches), frames, self.video_encoder.num_patches))

    # -- model side -------------------------------------------------------------------------

    def install(self) -> None:
        """Route this instance's image and video features through FlowCut."""
        super().install()
        family = self

        def wrap(stock: Callable[..., Any]) -> Callable[..., Any]:
            def get_video_features(
                pixel_values_videos: torch.Tensor, vision_feature_layer: int | list[int] | None = None, **kwargs: Any
            ) -> compat.EncoderOutput | tuple:
                """Video features pruned frame by frame (installed by flowcut.apply on this instance)."""
                return family.video_features(stock, pixel_values_videos, vision_feature_layer, **kwargs)

            return get_video_features

        self.patch.override(self.base, "get_video_features", wrap)

    def video_features(
        self,
        stock: Callable[..., Any],
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: Any,
        **kwargs: Any,
    ) -> compat.EncoderOutput | tuple:
        """FlowCut's replacement for ``VideoLlavaModel.get_video_features``: each frame's share of the budget."""
        layer = self.model.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        feature_layer = feature_layer_index(layer, self.video_encoder.num_layers)
        videos, frames = pixel_values_videos.shape[:2]
        per_video = self.video_tokens(frames)
        patches = self.video_encoder.num_patches
        if per_video == self.stock_video_tokens(frames):
            output = stock(pixel_values_videos=pixel_values_videos, vision_feature_layer=vision_feature_layer, **kwargs)
            frame_traces = [self._stock_image_trace(torch.arange(patches)) for _ in range(frames)]
            self.on_trace(self._pass_trace([], [frame_traces] * videos, feature_layer))
            return media_encoding(output, ([frame_traces] * videos, None))

        budgets = frame_budgets(per_video, frames, patches) * videos
        pixels = pixel_values_videos.flatten(0, 1)
        features: list[torch.Tensor | None] = [None] * len(budgets)
        traces: list[ImageTrace | None] = [None] * len(budgets)
        scoring_seconds: float | None = None
        # Frames with the same budget are one method call; a frame's tokens depend on it alone.
        for budget in sorted(set(budgets)):
            chosen = [frame for frame, frame_budget in enumerate(budgets) if frame_budget == budget]
            if budget == patches:  # nothing to prune: the stock tower's patches, without the frame's CLS
                encoded = stock(pixel_values_videos=pixels[chosen].unsqueeze(1), vision_feature_layer=layer, **kwargs)
                for row, frame in enumerate(chosen):
                    features[frame] = encoded.pooler_output[row, 1:]
                    traces[frame] = self._stock_image_trace(torch.arange(patches))
                continue
            call = EncoderCall(
                replace(self.config, keep=budget),
                self.video_encoder,
                pixels[chosen],
                feature_layer,
                self.video_encoder.grid_size,
                self.base.multi_modal_projector,
            )
            with self.video_encoder.session() as encoder:
                selected = self.method.run(replace(call, encoder=encoder))
            for row, frame in enumerate(chosen):
                features[frame], traces[frame] = selected.features[row], selected.images[row]
            scoring_seconds = total_scoring_seconds(scoring_seconds, selected.scoring_seconds)
        video_features = torch.cat(features).view(videos, per_video, -1)
        frame_traces = [traces[video * frames : (video + 1) * frames] for video in range(videos)]
        self.on_trace(self._pass_trace([], frame_traces, feature_layer, scoring_seconds))
        output = compat.encoder_output(pooler_output=video_features)
        if not kwargs.get("return_dict", True):
            return output.to_tuple()
        return media_encoding(output, (frame_traces, None), scoring_seconds)

    def _pass_trace(
        self,
        images: list[ImageTrace],
        videos: list[list[ImageTrace]],
        feature_layer: int,
        scoring_seconds: float | None = None,
    ) -> PruningTrace:
        """The trace of a pass's images and videos (frame by frame)."""
        grid, keep = self.video_encoder.grid_size, self.config.keep
        trace = PruningTrace(images, grid, keep, feature_layer, videos=videos, video_keep=self.video_keep)
        if scoring_seconds is not None:
            trace.scoring_ms = 1000 * scoring_seconds
        return trace

    def _before_forward(
        self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        """Refuse videos for language-stage methods, check the video placeholders, then the images'."""
        has_video = kwargs.get("pixel_values_videos") is not None or bool(
            (kwargs.get("mm_encoder_outputs") or {}).get("video")
        )
        if has_video and self.method.stage == "language" and self.method.prunes:
            raise ValueError(
                f"method {self.config.method!r} prunes inside the language model and covers images only on "
                "Video-LLaVA; prune videos with an encoder-stage method (flowcut, visionzip, divprune, pool, random)"
            )
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        videos = kwargs.get("pixel_values_videos")
        if input_ids is not None and videos is not None:
            count, frames = videos.shape[:2]
            placeholders = int((input_ids == self.video_token_id).sum())
            expected, stock = count * self.video_tokens(frames), count * self.stock_video_tokens(frames)
            check_placeholder_count(placeholders, expected, stock, images=count, kind="video")
        super()._before_forward(module, args, kwargs)
        if compat.cache_length(compat.cache_argument(kwargs)) > 0:
            return None
        return self._encode_videos(args, kwargs)

    def _encode_videos(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Encode a pass that holds videos here, and publish one trace of its images and videos.

        ``generate`` brings the pass's encodings (``mm_encoder_outputs``); a plain forward pass brings
        pixels, encoded here through this instance's ``get_*_features`` the same way. Each encoding
        carries its own traces, so the pass's trace is built from its encodings alone. Passes without
        videos are LLaVA-1.5's (their image encoding publishes the trace).
        """
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        videos, pixels = kwargs.get("pixel_values_videos"), kwargs.get("pixel_values")
        if videos is None and encoded.get("video") is None:
            return None
        kwargs = dict(kwargs)
        layer = kwargs.get("vision_feature_layer")
        if videos is not None:
            encoded["video"] = self.base.get_video_features(videos, vision_feature_layer=layer)
            kwargs["pixel_values_videos"] = None
            if pixels is not None:  # the model takes either pixels or encodings, not both
                strategy = kwargs.get("vision_feature_select_strategy")
                encoded["image"] = self.base.get_image_features(
                    pixels, vision_feature_layer=layer, vision_feature_select_strategy=strategy
                )
                kwargs["pixel_values"] = None
        kwargs["mm_encoder_outputs"] = encoded
        image, video = encoded.get("image"), encoded["video"]
        if isinstance(video, MediaEncoding) and (image is None or isinstance(image, MediaEncoding)):
            images = [] if image is None else image.media[0]
            seconds = total_scoring_seconds(encoding_scoring(image), encoding_scoring(video))
            layer = self.model.config.vision_feature_layer if layer is None else layer
            feature_layer = feature_layer_index(layer, self.video_encoder.num_layers)
            self.on_trace(self._pass_trace(images, video.media[0], feature_layer, seconds))
        return args, kwargs

    # -- processor side ---------------------------------------------------------------------

    def patch_processor(self, processor: Any) -> None:
        """Make ``processor`` emit the pruned placeholder counts of images and videos (instance-level, reversible)."""
        adapt_processor(
            processor,
            self.patch,
            self.image_token_id,
            self.family_name,
            self._image_placeholders,
            self._video_placeholders,
        )

    def _video_placeholders(self, stock_count: int, video_inputs: dict, index: int) -> int:
        """Placeholders for video ``index`` of ``video_inputs``, which the processor would give ``stock_count``."""
        frames = len(video_inputs["pixel_values_videos"][index])
        if stock_count != self.stock_video_tokens(frames):
            raise ValueError(
                f"the processor makes {stock_count} video tokens for {frames} frames but the video tower gives "
                f"{self.stock_video_tokens(frames)}: processor and model do not match"
            )
        return self.video_tokens(frames)
