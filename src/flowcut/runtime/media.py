"""The runtime every family shares: one pre-hook that encodes a pass's media and prepares its prefill.

What the language model sees of an image or video is decided in the vision encoder (the encoder
stage) and, for methods and families that prune there too, after a decoder layer (SPEC §4). That
layer must know what the encoder made of every image and video of the pass, so the pass's media are
encoded *before* the forward pass: ``generate`` already does this (through the instance's
``get_*_features``) and hands the encodings in ``mm_encoder_outputs``; a plain forward pass brings
pixels, which the pre-hook encodes the same way. Each encoding carries its items
(:mod:`flowcut.runtime.encoding`), so everything below is built from the pass's own arguments and
returned or handed on as values: nothing of a pass is kept on the family.

A family declares its kinds of media (:class:`MediaKind`), how it traces a pass
(:meth:`MediaFamily.publish`) and, where it must, how the pass's positions change
(:meth:`MediaFamily.adjust_pass`: Qwen's M-RoPE). The items of a kind tell their ``stock_tokens``,
``placeholders`` (tokens entering the language model) and ``budget`` (tokens after the pruning layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flowcut import compat
from flowcut.config import FlowCutConfig, tokens_to_keep
from flowcut.methods import TWO_STAGE_REASON, available_method, get_method, stages, two_stage_methods
from flowcut.runtime.encoding import MediaEncoding, encoded_media, encoding_scoring, total_scoring_seconds
from flowcut.runtime.family import ModelFamily
from flowcut.runtime.language import decoder_pruner, images_key, media_prefill, prompt_layout
from flowcut.runtime.processor import adapt_processor, check_media_placeholders
from flowcut.trace import PruningTrace


@dataclass(frozen=True)
class MediaKind:
    """One kind of media a family's prompts hold (images, videos)."""

    name: str
    """"image" or "video": the key of its encodings in ``mm_encoder_outputs``."""
    token_id: int | None
    """Its placeholder token id (None: the model has no such media)."""
    pixels: str
    """The forward argument that brings its pixels."""
    encode: Callable[[dict[str, Any]], Any]
    """Encodes the pass's pixels of this kind (the forward's arguments) through the instance's ``get_*_features``."""
    planned: Callable[[dict[str, Any]], list[Any]]
    """The pass's items of this kind as far as its arguments tell before encoding ([] where they do not)."""


@dataclass
class PassMedia:
    """The images and videos of one pass: per kind, its items and what the family's encoding adds to them."""

    encoded: dict[str, tuple[list[Any], Any]]
    """Kind name -> (items in batch order, the family's extra description: traces, grids)."""
    scoring_seconds: float | None = None
    """With ``time_scoring``: the encoder stage's scoring and selection time over the pass's media."""

    def items(self, kind: str) -> list[Any]:
        """The items of ``kind`` in batch order ([] where the pass has none)."""
        return self.encoded.get(kind, ([], None))[0]

    def extra(self, kind: str) -> Any:
        return self.encoded.get(kind, ([], None))[1]

    @property
    def all_items(self) -> list[Any]:
        return [item for items, _ in self.encoded.values() for item in items]


Kept = dict[str, list[torch.Tensor | None]]
"""Per kind, per item: the mask over its placeholders of the tokens the language-model stage kept."""


@dataclass(frozen=True)
class MediaItem:
    """The token counts of one image or video, for families where they are all there is to say."""

    stock_tokens: int
    """Visual tokens of the unpruned model."""
    placeholders: int
    """Visual tokens entering the language model."""
    budget: int
    """Visual tokens after the language model's pruning layer."""
    runs: tuple[int, ...] = ()
    """Where the processor writes the item as several runs of placeholders with text between them (Qwen3-VL's
    timestamped video slices): the placeholders of each run; empty for one run."""


class MediaFamily(ModelFamily):
    """A family whose pre-hook encodes the pass's media and hands the language-model pruner one prefill."""

    same_counts_per_item: bool = False
    """Whether every item of a kind has the same token counts (errors then state them per item)."""
    takes_sliced_encodings: bool = False
    """Whether a pass may bring encodings that do not describe their items: sliced per chunk by
    ``generate(prefill_chunk_size=...)``, or made without FlowCut. Families whose token counts do not
    depend on the item (LLaVA-1.5) run such a pass as it is, where no decoder layer prunes."""

    def media_kinds(self) -> list[MediaKind]:
        """The kinds of media this model's prompts hold, images first."""
        raise NotImplementedError

    def publish(self, media: PassMedia, kept: Kept | None, positions: torch.Tensor | None) -> None:
        """Trace a pass: ``kept`` from the language-model stage (None where no decoder layer pruned)."""
        raise NotImplementedError

    def adjust_pass(self, input_ids: torch.Tensor, kwargs: dict[str, Any], media: PassMedia) -> None:
        """Change the pass's arguments for its encoded media (positions); nothing by default."""

    def visual_tokens(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The pass's visual tokens: a ``(B, L)`` mask, by default the placeholders of every kind."""
        ids = [kind.token_id for kind in self.media_kinds() if kind.token_id is not None]
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

    def check_placeholders(self, input_ids: torch.Tensor, items: dict[str, list[Any]]) -> None:
        """Explain a placeholder count made for the unpruned model before the model's own check fails."""
        media = [(kind.token_id, items[kind.name], kind.name) for kind in self.media_kinds()]
        check_media_placeholders(input_ids, media, self.same_counts_per_item)

    # -- processor side ---------------------------------------------------------------------

    def processor_image(self, stock_count: int, image_size: tuple[int, int] | None) -> Any:
        """The item of an image of ``image_size`` for which the stock processor writes ``stock_count`` placeholders."""
        raise NotImplementedError

    def processor_video(self, video_inputs: dict, index: int) -> Any:
        """The item of video ``index`` of the processor's ``video_inputs`` (families with videos)."""
        raise NotImplementedError

    def patch_processor(self, processor: Any) -> None:
        """Make ``processor`` write each item's pruned placeholder count (instance-level, reversible)."""
        token_ids = {kind.name: kind.token_id for kind in self.media_kinds()}
        video = self.processor_video if token_ids.get("video") is not None else None
        adapt_processor(processor, self.patch, token_ids["image"], self.family_name, self.processor_image, video)

    def before_forward(
        self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        """Check the placeholders, encode the pass's media, fit the pass to them, hand the pruner its prefill."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = compat.cache_argument(kwargs)
        if self.pruner is not None:
            self.pruner.refuse_static_cache(cache, self.config.method)
        if compat.cache_length(cache) > 0:
            return None  # decoding: the prompt's pruning is already in place
        kwargs = dict(kwargs)
        kinds = self.media_kinds()
        if input_ids is not None:  # explain a prompt made for the unpruned model before anything is encoded
            self.check_placeholders(input_ids, {kind.name: kind.planned(kwargs) for kind in kinds})
        media = self._encode_pass(kinds, kwargs)
        items = media.all_items
        if input_ids is not None and items:
            self.check_placeholders(input_ids, {kind.name: media.items(kind.name) for kind in kinds})
            self.adjust_pass(input_ids, kwargs, media)
        language_prunes = self.pruner is not None and any(item.budget < item.placeholders for item in items)
        if self.pruner is not None:
            prefill = None
            if not items and input_ids is not None and self.visual_tokens(input_ids, kwargs).any():
                # transformers before 5.23 hands a chunked prefill's chunks neither pixels nor encodings
                raise ValueError(
                    "the prompt holds visual tokens but the pass brings no images or videos: language-model "
                    "pruning scores each prompt in one pass with its media; a prompt split over several passes "
                    "(generate(prefill_chunk_size=...)) is not supported"
                )
            if language_prunes:
                if input_ids is None:
                    raise ValueError(f"method {self.config.method!r} needs input_ids to find the visual tokens")
                visual = self.visual_tokens(input_ids, kwargs)
                layout = prompt_layout(input_ids, kwargs.get("attention_mask"), visual, images_key(kwargs))
                by_token = {kind.token_id: media.items(kind.name) for kind in kinds if kind.token_id is not None}
                prefill = media_prefill(layout, by_token, lambda positions, kept: self._report(media, positions, kept))
            self.pruner.start_prefill(prefill)
        if items and not language_prunes:
            self.publish(media, None, None)
        return args, kwargs

    def _encode_pass(self, kinds: list[MediaKind], kwargs: dict[str, Any]) -> PassMedia:
        """The pass's media, read from its encodings; pixels are encoded here (``kwargs`` then carries encodings)."""
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        for kind in kinds:
            if kwargs.get(kind.pixels) is not None:
                encoded[kind.name] = kind.encode(kwargs)
                kwargs[kind.pixels] = None
        if any(encoded.get(kind.name) is not None for kind in kinds):
            kwargs["mm_encoder_outputs"] = encoded
        described = {kind.name: self._described(encoded.get(kind.name), kind.name) for kind in kinds}
        seconds = total_scoring_seconds(*(encoding_scoring(encoded.get(kind.name)) for kind in kinds))
        return PassMedia(described, seconds)

    def _described(self, encoding: Any, kind: str) -> tuple[list[Any], Any]:
        """An encoding's items and extra description; none for an encoding that does not describe them."""
        if encoding is None:
            return [], None
        if self.takes_sliced_encodings and (not isinstance(encoding, MediaEncoding) or encoding.media is None):
            if self.pruner is not None:
                raise ValueError(
                    "language-model pruning scores each prompt in one pass: a prompt split over several passes "
                    "(generate(prefill_chunk_size=...)), or encodings made without FlowCut, are not supported"
                )
            return [], None
        return encoded_media(encoding, kind)

    def _report(
        self, media: PassMedia, positions: torch.Tensor, kept: list[tuple[tuple[int, int], torch.Tensor]]
    ) -> None:
        """Turn the pruner's report (per visual run: placeholder token id, item index, kept mask) into :data:`Kept`."""
        kinds = {kind.token_id: kind.name for kind in self.media_kinds() if kind.token_id is not None}
        masks: Kept = {name: [None] * len(items) for name, (items, _) in media.encoded.items()}
        for (token_id, index), mask in kept:
            masks[kinds[token_id]][index] = mask
        self.publish(media, masks, positions)


class TwoStageFamily(MediaFamily):
    """A family whose methods prune where :func:`flowcut.methods.stages` says: in the encoder, after a
    decoder layer, or both (SPEC §4: LLaVA-NeXT, LLaVA-OneVision, Qwen-VL). ``keep`` is each item's budget."""

    encoder_only_reason: str | None = None
    """Why the language model cannot take the language-model stage, where it cannot (Qwen3.5): every method
    then prunes in the encoder alone, as with ``stages="encoder"``, and language-model methods are refused."""

    def __init__(self, model: torch.nn.Module, config: FlowCutConfig, on_trace: Callable[[PruningTrace], None]):
        offered, reason, mode = two_stage_methods(), TWO_STAGE_REASON, config.stages
        if self.encoder_only_reason is not None:
            offered = tuple(name for name in offered if get_method(name).stage != "language")
            reason, mode = self.encoder_only_reason, "encoder"
        self.method = available_method(config.method, offered, type(model).__name__, reason)
        self.stages = stages(self.method, mode)
        super().__init__(model, on_trace)
        self.config = config
        if self.stages.language:
            language = self.base.language_model
            self.pruner = decoder_pruner(language, self.method.language_layer, self.method.language_score)

    @property
    def tokens_per_image(self) -> int | float:
        """The budget per image or video: a token count, or the configured ratio of each item's stock tokens."""
        return self.config.keep

    def budget(self, stock_tokens: int) -> int:
        """``T``: the tokens of an item of ``stock_tokens`` that the decoder layers after the pruning layer see."""
        return tokens_to_keep(self.config.keep, stock_tokens) if self.method.prunes else stock_tokens
