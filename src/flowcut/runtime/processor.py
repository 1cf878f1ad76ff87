"""The processor side of a pruned model: each image's placeholder run shrinks to the tokens it keeps.

Processors expand one image token into as many placeholders as the vision tower makes tokens
(``replace_image_token``) and report those counts (``_get_num_multimodal_tokens``). Both are
replaced on the one processor instance passed to :func:`flowcut.apply`, through the family's
:class:`~flowcut.runtime.InstancePatch`, so the model's own placeholder check stays on and passes
and removing the handle brings back whatever the processor had before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from flowcut import compat
from flowcut.runtime import InstancePatch

_ADAPTED = "flowcut_adapted"
"""Marks the replacements installed here, so a second handle on the same processor is refused."""


def _adapted(function: Callable[..., Any]) -> Callable[..., Any]:
    setattr(function, _ADAPTED, True)
    return function


def adapt_processor(
    processor: Any,
    patch: InstancePatch,
    image_token_id: int,
    family: str,
    image_item: Callable[[int, Any], Any],
    video_item: Callable[[dict, int], Any] | None = None,
    counted_markers: int = 0,
    frames_as_images: bool = False,
) -> None:
    """Make ``processor`` write each image's and video's pruned placeholder count.

    ``image_item(n, size)`` is the item (its ``stock_tokens`` and ``placeholders``) of an image of
    ``size`` (its original (height, width) where the processor reports it, else None) for which the
    processor would write ``n`` placeholders; ``video_item(video_inputs, index)``, where given, that of
    video ``index`` of the processed ``video_inputs``. ``counted_markers``: the tokens the processor's
    counter adds to each image's placeholders (InternVL: its start and end markers). A processor whose
    stock count differs from the item's does not belong to the model, and is refused. The changes go
    into ``patch``; its ``restore()`` undoes them. Each run of image placeholders the stock processor
    writes is one item's (Gemma 3 writes one run per pan-and-scan crop); a video may be several runs
    (Qwen3-VL: one per timestamped slice, counts from ``item.runs``). The placeholder counter
    (``_get_num_multimodal_tokens``) is adapted for images; its video counts stay the stock ones.
    ``frames_as_images``: the processor writes a video's frames with the image placeholder, each frame
    an image item of its own (InternVL).
    """

    def placeholders(stock: int, size: Any) -> int:
        return _checked(image_item(stock, size), stock, "image", f"an image of {size}" if size else "an image")

    def video_runs(stock_runs: list[int], video_inputs: dict, index: int) -> list[int]:
        item = video_item(video_inputs, index)  # type: ignore[misc]
        total = _checked(item, sum(stock_runs), "video", f"video {index}")
        if len(stock_runs) == 1:
            return [total]
        if len(item.runs) != len(stock_runs):
            raise ValueError(
                f"the processor writes video {index} as {len(stock_runs)} runs, the model expects {len(item.runs)}"
            )
        return list(item.runs)

    if not hasattr(processor, "replace_image_token") or getattr(processor, "image_token", None) is None:
        raise TypeError(f"expected a {family} processor with an image token, got {type(processor).__name__}")
    placeholder = _placeholder_token(processor, image_token_id)
    if getattr(processor.replace_image_token, _ADAPTED, False):
        raise ValueError(
            "this processor is already adapted by another FlowCut handle; give each pruned model its own "
            "processor instance (copy.deepcopy(processor))"
        )
    if video_item is not None and (
        getattr(processor, "video_token", None) is None or not hasattr(processor, "replace_video_token")
    ):
        raise TypeError(f"expected a processor with a video token, got {type(processor).__name__}")

    def wrap_replace(stock_replace: Callable[..., str]) -> Callable[..., str]:
        @_adapted
        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
            """The image's pruned placeholder runs (installed by flowcut.apply on this processor)."""
            sizes = image_inputs.get("image_sizes")
            size = None if sizes is None else tuple(int(side) for side in sizes[image_idx])
            text = stock_replace(image_inputs, image_idx=image_idx, **kwargs)
            return image_runs(text, size, f"image {image_idx}")

        return replace_image_token

    def image_runs(text: str, size: Any, what: str) -> str:
        """Each run of image placeholders in ``text`` as its image item's pruned run (a Gemma 3 crop, a frame)."""

        def counts(stock_runs: list[int]) -> list[int]:
            if not stock_runs:
                raise ValueError(f"the processor wrote no {placeholder!r} placeholders for {what}")
            return [placeholders(count, size) for count in stock_runs]

        return _rewrite_runs(text, placeholder, counts)

    def wrap_frames(stock_replace: Callable[..., str]) -> Callable[..., str]:
        def replace_video_token(video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
            """The video's frames as pruned image runs (installed by flowcut.apply on this processor)."""
            text = stock_replace(video_inputs, video_idx=video_idx, **kwargs)
            return image_runs(text, None, f"video {video_idx}")

        return replace_video_token

    def wrap_counts(stock_counts: Callable[..., Any]) -> Callable[..., Any]:
        def get_num_multimodal_tokens(image_sizes: Any = None, **kwargs: Any) -> Any:
            """The stock counts with each image's pruned placeholder count."""
            data = stock_counts(image_sizes=image_sizes, **kwargs)
            if getattr(data, "num_image_tokens", None) is not None:
                sizes = image_sizes if image_sizes is not None else [None] * len(data.num_image_tokens)
                data.num_image_tokens = [
                    placeholders(count - counted_markers, None if size is None else tuple(size)) + counted_markers
                    for count, size in zip(data.num_image_tokens, sizes, strict=True)
                ]
            return data

        return get_num_multimodal_tokens

    def wrap_video_replace(stock_replace: Callable[..., str]) -> Callable[..., str]:
        def replace_video_token(video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
            """The video's pruned placeholder runs (installed by flowcut.apply on this processor)."""
            text = stock_replace(video_inputs, video_idx=video_idx, **kwargs)
            # Qwen3-VL: a run per timestamped slice
            return _rewrite_runs(text, processor.video_token, lambda runs: video_runs(runs, video_inputs, video_idx))

        return replace_video_token

    patch.override(processor, "replace_image_token", wrap_replace)
    if compat.multimodal_token_counter(processor) is not None:
        patch.override(processor, compat.MULTIMODAL_TOKEN_COUNTS, wrap_counts)
    if video_item is not None:
        patch.override(processor, "replace_video_token", wrap_video_replace)
    elif frames_as_images and hasattr(processor, "replace_video_token"):
        patch.override(processor, "replace_video_token", wrap_frames)


def _rewrite_runs(text: str, token: str, counts: Callable[[list[int]], list[int]]) -> str:
    """``text`` with its runs of ``token`` rewritten: ``counts`` maps the runs' lengths to their new ones."""
    parts = re.split(f"((?:{re.escape(token)})+)", text)  # the runs at the odd indices
    runs = range(1, len(parts), 2)
    for run, count in zip(runs, counts([len(parts[run]) // len(token) for run in runs]), strict=True):
        parts[run] = token * count
    return "".join(parts)


def _placeholder_token(processor: Any, image_token_id: int) -> str:
    """The token the processor repeats for each of an image's visual tokens: the model's image token.

    Most processors expand their ``image_token`` itself; Gemma 3's expands its begin-of-image marker
    into a run of the tokenizer's ``image_token``.
    """
    if getattr(processor, "image_token_id", image_token_id) == image_token_id:
        return processor.image_token
    tokenizer = getattr(processor, "tokenizer", None)
    if getattr(tokenizer, "image_token_id", None) == image_token_id and getattr(tokenizer, "image_token", None):
        return tokenizer.image_token
    raise ValueError(f"processor image token id {processor.image_token_id} differs from the model's {image_token_id}")


def _checked(item: Any, stock: int, kind: str, what: str) -> int:
    """The item's placeholder count, once its stock count is the processor's."""
    if item.stock_tokens != stock:
        raise ValueError(
            f"the processor makes {stock} {kind} tokens for {what} but the model makes {item.stock_tokens}: "
            "processor and model do not match"
        )
    return item.placeholders


def check_placeholder_count(
    placeholders: int, expected: int, stock: int, images: int | None = None, kind: str = "image"
) -> None:
    """Explain a prompt built for the unpruned model before the model's own placeholder check fails.

    ``expected`` and ``stock`` are the prompt's image tokens with and without pruning; ``images``,
    where every image has the same counts, states them per image.
    """
    if placeholders == expected or placeholders != stock:
        return
    if images:
        stock, expected, per = stock // images, expected // images, f"per {kind}"
    else:
        per = f"for its {kind}s"
    raise ValueError(
        f"the prompt holds {stock} {kind} tokens {per}, but this model keeps {expected}: build inputs with the "
        "processor passed to flowcut.apply(model, processor=processor, keep=...), which shrinks the "
        "placeholders to match"
    )


def check_media_placeholders(
    input_ids: Any, media: list[tuple[int | None, list[Any], str]], per_item: bool = False
) -> None:
    """:func:`check_placeholder_count` for each kind of media of a prompt batch.

    ``media`` holds ``(placeholder token id, items, kind)``; each item tells its ``placeholders``
    (with pruning) and ``stock_tokens`` (without). Kinds without items are skipped. ``per_item``:
    every item of a kind has the same counts, and the error states them per item.
    """
    for token_id, items, kind in media:
        if items:
            placeholders = int((input_ids == token_id).sum())
            expected = sum(item.placeholders for item in items)
            stock = sum(item.stock_tokens for item in items)
            check_placeholder_count(placeholders, expected, stock, len(items) if per_item else None, kind=kind)
