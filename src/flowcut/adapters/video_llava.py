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
from flowcut.runtime.encoding import total_scoring_seconds
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
        self._emit = on_trace
        super().__init__(model, config, self._image_trace)
        self.video_keep = config.keep  # LlavaFamily turned a ratio into a per-image count; videos need the ratio
        self.video_encoder = ClipEncoderAdapter(self.base.video_tower)
        self.video_token_id = model.config.video_token_id
        self._pass_images: PruningTrace | None = None
        """The image trace of the pass being prepared, joined by its videos' trace."""

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
        # A pass's images must not join a later pass's videos in a trace, even after an error.
        self.patch.hook(self.model.register_forward_hook(self._forget_images, always_call=True))

    def _forget_images(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._pass_images = None

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
            self._video_trace([frame_traces] * videos, feature_layer)
            return output

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
            with self.video_encoder.session():
                selected = self.method.run(call)
            for row, frame in enumerate(chosen):
                features[frame], traces[frame] = selected.features[row], selected.images[row]
            scoring_seconds = total_scoring_seconds(scoring_seconds, selected.scoring_seconds)
        video_features = torch.cat(features).view(videos, per_video, -1)
        frame_traces = [traces[video * frames : (video + 1) * frames] for video in range(videos)]
        self._video_trace(frame_traces, feature_layer, scoring_seconds)
        output = compat.encoder_output(pooler_output=video_features)
        return output if kwargs.get("return_dict", True) else output.to_tuple()

    def _image_trace(self, trace: PruningTrace) -> None:
        self._pass_images = trace
        self._emit(trace)

    def _video_trace(
        self, videos: list[list[ImageTrace]], feature_layer: int, scoring_seconds: float | None = None
    ) -> None:
        """Publish the pass's trace: its images (where encoded just before) and its videos, frame by frame."""
        images = self._pass_images
        trace = PruningTrace(
            [] if images is None else images.images,
            self.video_encoder.grid_size,
            self.config.keep,
            feature_layer,
            videos=videos,
            video_keep=self.video_keep,
        )
        if scoring_seconds is not None:
            trace.scoring_ms = 1000 * scoring_seconds
        self._emit(trace)

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
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
        self._pass_images = None
        super()._before_forward(module, args, kwargs)

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
