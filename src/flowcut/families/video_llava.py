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
from typing import Any

import torch
from transformers import VideoLlavaForConditionalGeneration

from flowcut import compat
from flowcut.config import FlowCutConfig, frame_budgets, tokens_to_keep
from flowcut.families.clip import ClipEncoderAdapter, feature_layer_index
from flowcut.families.llava import LlavaFamily
from flowcut.families.single_stage import stock_image_trace
from flowcut.runtime.encoding import media_encoding
from flowcut.runtime.family import Handler
from flowcut.runtime.media import Kept, MediaItem, MediaKind, PassMedia
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

    def entry_points(self) -> dict[str, Handler]:
        """This instance's image and video features go through FlowCut."""
        return {**super().entry_points(), "get_video_features": self.video_features}

    def video_item(self, frames: int) -> MediaItem:
        """A video's token counts (no decoder layer prunes videos)."""
        tokens = self.video_tokens(frames)
        return MediaItem(self.stock_video_tokens(frames), tokens, tokens)

    def media_kinds(self) -> list[MediaKind]:
        video = MediaKind(
            "video", self.video_token_id, "pixel_values_videos", self._encode_videos, self._planned_videos
        )
        return [*super().media_kinds(), video]

    def _encode_videos(self, kwargs: dict[str, Any]) -> Any:
        layer = kwargs.get("vision_feature_layer")
        return self.base.get_video_features(kwargs["pixel_values_videos"], vision_feature_layer=layer)

    def _planned_videos(self, kwargs: dict[str, Any]) -> list[MediaItem]:
        videos = kwargs.get("pixel_values_videos")
        return [] if videos is None else [self.video_item(videos.shape[1])] * videos.shape[0]

    def video_features(
        self,
        stock: Callable[..., Any],
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: Any = None,
        **kwargs: Any,
    ) -> compat.EncoderOutput | tuple:
        """FlowCut's replacement for ``VideoLlavaModel.get_video_features``: each frame's share of the budget."""
        layer = self.model.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        feature_layer = feature_layer_index(layer, self.video_encoder.num_layers)
        videos, frames = pixel_values_videos.shape[:2]
        item = self.video_item(frames)
        patches, layers = self.video_encoder.num_patches, self.video_encoder.num_layers
        if item.placeholders == item.stock_tokens:
            output = stock(pixel_values_videos=pixel_values_videos, vision_feature_layer=vision_feature_layer, **kwargs)
            frame_traces = [stock_image_trace(torch.arange(patches), layers, patches) for _ in range(frames)]
            media = ([item] * videos, ([frame_traces] * videos, feature_layer))
            self.publish(PassMedia({"video": media}), None, None)
            return media_encoding(output, media)

        budgets = frame_budgets(item.placeholders, frames, patches) * videos

        def whole_frames(pixels: torch.Tensor) -> torch.Tensor:
            """Frames kept whole: the stock tower's patches, without the frame's CLS."""
            encoded = stock(pixel_values_videos=pixels.unsqueeze(1), vision_feature_layer=layer, **kwargs)
            return encoded.pooler_output[:, 1:]

        pixels = pixel_values_videos.flatten(0, 1)
        views = self.encode_views(self.video_encoder, pixels, budgets, feature_layer, whole_frames)
        scoring_seconds = views.scoring_seconds
        video_features = torch.cat(views.features).view(videos, item.placeholders, -1)
        frame_traces = [views.traces[video * frames : (video + 1) * frames] for video in range(videos)]
        media = ([item] * videos, (frame_traces, feature_layer))
        self.publish(PassMedia({"video": media}, scoring_seconds), None, None)
        output = compat.encoder_output(pooler_output=video_features)
        return media_encoding(output, media, scoring_seconds)

    def publish(self, media: PassMedia, kept: Kept | None, positions: torch.Tensor | None) -> None:
        """One trace of a pass's images and videos (frame by frame); a pass of images only as LLaVA-1.5's."""
        if not media.items("video"):
            super().publish(media, kept, positions)
            return
        images, _ = media.extra("image") or ([], None)
        videos, feature_layer = media.extra("video")
        grid, keep = self.video_encoder.grid_size, self.config.keep
        trace = PruningTrace(images, grid, keep, feature_layer, videos=videos, video_keep=self.video_keep)
        if media.scoring_seconds is not None:
            trace.scoring_ms = 1000 * media.scoring_seconds
        self.on_trace(trace)

    def before_forward(
        self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        """Refuse videos for language-stage methods; the rest as every family."""
        has_video = kwargs.get("pixel_values_videos") is not None or bool(
            (kwargs.get("mm_encoder_outputs") or {}).get("video")
        )
        if has_video and self.method.stage == "language" and self.method.prunes:
            raise ValueError(
                f"method {self.config.method!r} prunes inside the language model and covers images only on "
                "Video-LLaVA; prune videos with an encoder-stage method (flowcut, visionzip, divprune, pool, random)"
            )
        return super().before_forward(module, args, kwargs)

    # -- processor side ---------------------------------------------------------------------

    def processor_video(self, video_inputs: dict, index: int) -> MediaItem:
        return self.video_item(len(video_inputs["pixel_values_videos"][index]))
