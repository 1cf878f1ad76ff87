"""Pruning visual tokens inside a decoder-only language model, after one decoder layer (prefill only).

Layers up to ``layer`` see every token; the output of ``layer`` keeps the non-visual tokens and
each image's best ``keep`` visual tokens (scored from that layer's own attention inputs, recorded
through the attention seam); later layers see the shorter sequence. Generation stays consistent:
the kept tokens keep their original rotary positions, the attention masks of later layers are cut
to the kept columns, and the KV cache of every later layer simply holds the shorter prompt, while
the cache length the model reads (layer 0's) still counts the full prompt so new tokens get the
right positions. Everything is done with hooks on one model instance and removed by
:meth:`DecoderPruner.remove`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flowcut import compat
from flowcut.core.encoder_stage import AttentionRecorder
from flowcut.core.language_stage import (
    kept_per_image,
    kept_positions,
    kept_visual_rows,
    last_real_positions,
    last_token_scores,
    media_budgets,
)
from flowcut.runtime.attention import RECORDING_ATTENTION, resolve_attention

Budgets = Callable[[torch.Tensor], tuple[list[list[int]], list[list[int]]]]
"""From a ``(B, L)`` visual-token mask: per row, the lengths of its images and their budgets."""

OnPrune = Callable[[torch.Tensor, list[torch.Tensor]], None]
"""Told of each prune: the ``(B, L')`` positions later layers hold, and per image (batch order) the mask
over its visual tokens of those that continue."""


@dataclass
class PromptLayout:
    """What the pruner needs to know about one prefill: where the visual tokens and the last tokens are."""

    visual: torch.Tensor
    """``(B, L)``: visual-token positions."""
    visible: torch.Tensor
    """``(B, L)``: real (non-padding) positions."""
    last_index: torch.Tensor
    """``(B,)``: each row's last real position."""
    input_ids: torch.Tensor
    """The prompt itself, to recognise a later uncached pass that continues it."""
    images_key: tuple[torch.Tensor, ...] | None = None
    """The pass's images (:func:`images_key`): a continuation must show the same images."""


@dataclass
class PrunedPrompt:
    """The outcome of one prefill, kept for the decoding steps that continue it."""

    positions: torch.Tensor
    """``(B, L')`` prompt positions that later layers hold, ascending."""
    prompt_length: int
    cache: Any
    visual: torch.Tensor
    """``(B, prompt_length)``: visual-token positions of the prompt."""
    input_ids: torch.Tensor | None = None
    """The prompt that was scored, to recognise an uncached pass that continues it."""
    scored_positions: torch.Tensor | None = None
    """The kept positions of that scored prompt (``positions`` grows when a pass continues it)."""
    filler: torch.Tensor | None = None
    """``(B, L')``: kept slots that only pad a shorter row and must not be attended to (None: no such slot)."""
    images_key: tuple[torch.Tensor, ...] | None = None
    prefill: LanguagePrefill | None = None
    """The pass that produced it (a continuation: the continuing pass), which is told of the prune."""


@dataclass
class LanguagePrefill:
    """One prefill the pruner may prune, as the pass that starts it sees it: built by the family's pre-hook."""

    layout: PromptLayout
    budgets: Budgets
    """Per row, the placeholder count and budget of each of its images and videos (from a visual mask)."""
    report: OnPrune
    """Told of the prune (the family traces it against this pass's media)."""


def prompt_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    visual: int | torch.Tensor,
    images: Any = None,
) -> PromptLayout:
    """The layout of a prompt batch (left or right padding); ``images``: the pass's :func:`images_key`.

    ``visual``: the image placeholder token id, or a ``(B, L)`` mask of the visual tokens (where the
    processor marks them, as Qwen2-VL's ``mm_token_type_ids`` do; a generated token that happens to be
    a placeholder id is then text, as in the stock model).
    """
    visible = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    visual = input_ids == visual if isinstance(visual, int) else visual.bool() & visible
    return PromptLayout(visual, visible, last_real_positions(visible), input_ids, images)


def images_key(kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
    """The images a model pass brings (pixels, or the features encoded before it), kept by reference.

    Two prompts with the same token ids but different images of the same size must not share a
    pruning decision; :func:`_same_images` compares them, only when a pass could continue a prompt.
    """
    key: list[torch.Tensor] = []
    for pixels_name, kind in (("pixel_values", "image"), ("pixel_values_videos", "video")):
        pixels = kwargs.get(pixels_name)
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get(kind)
        if pixels is not None:
            key.append(pixels.detach())
        elif encoded is not None and encoded.pooler_output is not None:
            key.extend(feature.detach() for feature in encoded.pooler_output)
    return tuple(key) if key else None


def prompt_order_budgets(
    prompt_ids: torch.Tensor, visual: torch.Tensor, media: dict[int, list[Any]]
) -> tuple[list[list[int]], list[list[int]], list[tuple[int, int]]]:
    """:func:`~flowcut.core.language_stage.media_budgets` for items that tell their ``placeholders`` and ``budget``.

    ``media`` maps a placeholder token id to its items in batch order; ``prompt_ids`` may run past
    ``visual`` (an uncached pass that continues the prompt): only the prompt's part is read.
    """
    counts = {
        token: ([item.placeholders for item in items], [item.budget for item in items])
        for token, items in media.items()
    }
    return media_budgets(prompt_ids[:, : visual.shape[1]], visual, counts)


MediaReport = Callable[[torch.Tensor, list[tuple[tuple[int, int], torch.Tensor]]], None]
"""Told of a prune over media: the kept positions, and per visual run ``((token_id, index), kept mask)``."""


def media_prefill(layout: PromptLayout, media: dict[int, list[Any]], report: MediaReport) -> LanguagePrefill:
    """The prefill of a pass over ``media`` (placeholder token id -> items in batch order, each with its
    ``placeholders`` and ``budget``): budgets in prompt order, and the prune told per item."""
    order: list[tuple[int, int]] = []

    def budgets(visual: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
        lengths, keeps, found = prompt_order_budgets(layout.input_ids, visual, media)
        order[:] = found  # which item each visual run is, for the report that follows
        return lengths, keeps

    def told(positions: torch.Tensor, kept: list[torch.Tensor]) -> None:
        report(positions, list(zip(order, kept, strict=True)))

    return LanguagePrefill(layout, budgets, told)


def _same_images(first: tuple[torch.Tensor, ...] | None, second: tuple[torch.Tensor, ...] | None) -> bool:
    if first is None or second is None:
        return first is second
    return len(first) == len(second) and all(
        a.shape == b.shape and torch.equal(a, b.to(a.device)) for a, b in zip(first, second, strict=True)
    )


def decoder_pruner(language_model: torch.nn.Module, layer: int, score: str) -> DecoderPruner:
    """A :class:`DecoderPruner` on a decoder-only language model's layers, with the attention they use."""
    layers = list(language_model.layers)
    attention = layers[0].self_attn
    eager = compat.eager_attention(attention)
    return DecoderPruner(layers, attention.config, eager, layer, score)


class DecoderPruner:
    """Installs language-model pruning on the decoder layers of one model instance."""

    def __init__(
        self,
        decoder_layers: list[torch.nn.Module],
        attention_config: Any,
        eager_attention: Callable[..., Any],
        layer: int,
        score: str,
    ) -> None:
        if not 0 <= layer < len(decoder_layers) - 1:
            raise ValueError(
                f"language-model pruning after decoder layer {layer} needs a later layer; "
                f"the model has {len(decoder_layers)}"
            )
        self.layers = decoder_layers
        self.config = attention_config
        self.eager_attention = eager_attention
        self.layer = layer
        self.score = score
        self.prefill: LanguagePrefill | None = None
        """The prefill the coming pass starts (None: nothing to prune in it); used once."""
        self.pruned: PrunedPrompt | None = None
        """The last pruned prompt: decoding steps continue it through its own cache."""
        self._recorder: AttentionRecorder | None = None
        self._implementation: str | None = None
        self._handles: list[Any] = []
        self._pinned: PrunedPrompt | None = None

    def install(self) -> None:
        """Register the hooks."""
        scoring = self.layers[self.layer]
        self._handles = [
            scoring.register_forward_pre_hook(self._before_scoring_layer, with_kwargs=True),
            scoring.register_forward_hook(self._after_scoring_layer, always_call=True),
        ]
        for later in self.layers[self.layer + 1 :]:
            self._handles.append(later.register_forward_pre_hook(self._before_later_layer, with_kwargs=True))

    def remove(self) -> None:
        """Remove every hook and forget the state."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.prefill = self.pruned = self._pinned = None

    def start_prefill(self, prefill: LanguagePrefill | None) -> None:
        """Called before a model pass without a filled cache (``prefill=None``: nothing to prune in it).

        A pass that continues the last pruned prompt without its cache (``generate(use_cache=False)``,
        or recomputing prompt + generated tokens) keeps that prompt's tokens: the prompt is pruned
        once, from its own last token, as it is with the cache.
        """
        previous = self.pruned
        scored = None if previous is None else previous.input_ids
        layout = None if prefill is None else prefill.layout
        input_ids = None if layout is None else layout.input_ids
        if (
            input_ids is not None
            and scored is not None
            and input_ids.shape[0] == scored.shape[0]
            and input_ids.shape[1] > scored.shape[1]
            and torch.equal(input_ids[:, : scored.shape[1]], scored.to(input_ids.device))
            and _same_images(layout.images_key, previous.images_key)
        ):
            base = previous.scored_positions
            added = torch.arange(scored.shape[1], input_ids.shape[1], device=base.device)
            positions = torch.cat([base, added.expand(input_ids.shape[0], -1)], dim=1)
            filler = previous.filler
            if filler is not None:  # the scored prompt's fillers, then the continuation's real tokens
                continuation = torch.zeros_like(added, dtype=torch.bool).expand(len(filler), -1)
                filler = torch.cat([filler[:, : base.shape[1]], continuation], dim=1)
            pinned = PrunedPrompt(
                positions, input_ids.shape[1], None, layout.visual, scored, base, filler, layout.images_key, prefill
            )
            self.prefill, self._pinned, self.pruned = None, pinned, None
            return
        self.prefill, self._pinned, self.pruned = prefill, None, None

    def _flash(self) -> bool:
        """Whether the decoder attends with FlashAttention (which takes 2-D masks of real tokens)."""
        implementation = compat.attention_implementation(self.config)
        return isinstance(implementation, str) and implementation.startswith("flash")

    # -- hooks ----------------------------------------------------------------------------------

    def _before_scoring_layer(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden_states = compat.layer_hidden_states(args, kwargs)
        if self.prefill is None or hidden_states.shape[1] != self.prefill.layout.visual.shape[1]:
            return None
        if not self.prefill.layout.visual.any():
            return None
        self._implementation = compat.attention_implementation(self.config)
        self._recorder = AttentionRecorder()
        kwargs = dict(kwargs)
        kwargs["flowcut_recorder"] = self._recorder
        kwargs["flowcut_attention"] = resolve_attention(self._implementation, self.eager_attention)
        kwargs["flowcut_implementation"] = self._implementation
        # Only this layer's pass records: the switch is undone as soon as the layer returns.
        compat.set_attention_implementation(self.config, RECORDING_ATTENTION)
        return args, kwargs

    def _after_scoring_layer(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        pinned = self._pinned
        if pinned is not None and not isinstance(output, BaseException):
            if compat.layer_output_states(output).shape[1] == pinned.prompt_length:
                self._pinned, self.pruned = None, pinned
                self._report(pinned.prefill, pinned.positions, pinned.visual, pinned.filler)
                return _keep_positions(output, pinned.positions)
        if self._recorder is None:
            return None
        compat.set_attention_implementation(self.config, self._implementation)
        recorder, self._recorder = self._recorder, None
        if isinstance(output, BaseException) or recorder.record is None:
            return None
        record = recorder.take()
        prefill = self.prefill
        layout = prefill.layout
        scores = last_token_scores(
            record.query,
            record.key,
            record.value,
            record.scaling,
            layout.last_index,
            layout.visible,
            layout.visual,
            self.score,
        )
        try:
            lengths, keeps = prefill.budgets(layout.visual)
        except ValueError as error:
            raise ValueError(
                f"{error}. Language-model pruning scores each prompt in one pass: a prompt split over several "
                "passes (generate(prefill_chunk_size=...)) is not supported"
            ) from error
        positions, filler = kept_positions(scores, layout.visual, lengths, keeps)
        length = compat.layer_output_states(output).shape[1]
        self.pruned = PrunedPrompt(
            positions, length, None, layout.visual, layout.input_ids, positions, filler, layout.images_key, prefill
        )
        self.prefill = None  # used once: a later pass must not be pruned by this prompt's layout
        self._report(prefill, positions, layout.visual, filler, lengths)
        return _keep_positions(output, positions)

    @staticmethod
    def _report(
        prefill: LanguagePrefill,
        positions: torch.Tensor,
        visual: torch.Tensor,
        filler: torch.Tensor | None,
        lengths: list[list[int]] | None = None,
    ) -> None:
        if lengths is None:
            lengths, _ = prefill.budgets(visual)
        prefill.report(positions, kept_per_image(positions, visual, filler, lengths))

    def visual_rows(self, visual: torch.Tensor, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Values given per visual token of the full prompt (``visual``, its ``(B, L)`` mask; ``rows``), for a
        later layer of the pass being pruned whose sequence is ``length`` long: the kept tokens' (mask, rows).

        Where the sequence is the full prompt (nothing pruned before this point), they come back as they are.
        """
        pruned = self.pruned
        if length == visual.shape[1] or pruned is None or pruned.positions.shape[1] != length:
            return visual, rows
        return kept_visual_rows(visual, rows, pruned.positions.to(visual.device))

    def refuse_static_cache(self, cache: Any, method: str) -> None:
        """Static (compileable) caches keep the full prompt length: pruning after a layer cannot use them."""
        if compat.is_static_cache(cache):
            raise ValueError(
                f"method {method!r} prunes inside the language model and needs a dynamic KV cache; "
                "static (compileable) caches keep the full prompt length"
            )

    def _before_later_layer(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        pruned = self.pruned
        if pruned is None:
            return None
        hidden_states = compat.layer_hidden_states(args, kwargs)
        cache = compat.cache_argument(kwargs)
        kwargs = dict(kwargs)
        prefill = hidden_states.shape[1] == pruned.positions.shape[1] and _length(kwargs) == pruned.prompt_length
        if prefill:
            pruned.cache = cache
            for name in ("position_ids", "position_embeddings"):
                if kwargs.get(name) is not None:
                    kwargs[name] = _gather_positions(kwargs[name], pruned.positions, pruned.prompt_length)
            mask = kwargs.get("attention_mask")
            if mask is not None:
                mask = _cut_mask(mask, pruned.positions, pruned.prompt_length, rows_too=True)
            kwargs["attention_mask"] = _hide_fillers(mask, pruned.filler, hidden_states, 0, self._flash())
            return args, kwargs
        if cache is None or cache is not pruned.cache:
            raise RuntimeError(
                "a pass continued a pruned prompt without its KV cache; language-model pruning supports "
                "prefill followed by cached decoding (model.generate), or single passes"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None:
            mask = _cut_mask(mask, pruned.positions, pruned.prompt_length, rows_too=False)
        if pruned.filler is not None:
            past = compat.cache_length(cache, compat.layer_index(module.self_attn))
            kwargs["attention_mask"] = _hide_fillers(mask, pruned.filler, hidden_states, past, self._flash())
        else:
            kwargs["attention_mask"] = mask
        return args, kwargs


def _keep_positions(output: Any, positions: torch.Tensor) -> Any:
    """A decoder layer's output with its hidden states cut to ``positions``."""
    return compat.with_layer_output_states(output, _gather(compat.layer_output_states(output), positions, dim=1))


def _length(kwargs: dict) -> int | None:
    """The sequence length the model prepared positions for (from its rotary embeddings or position ids)."""
    embeddings = kwargs.get("position_embeddings")
    if embeddings is not None:
        return embeddings[0].shape[-2]
    position_ids = kwargs.get("position_ids")
    return None if position_ids is None else position_ids.shape[-1]


def _gather(states: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Per row, the given positions along ``dim`` (the batch is dim 0)."""
    shape = [positions.shape[0]] + [1] * (states.dim() - 1)
    shape[dim] = positions.shape[1]
    index = positions.view(shape).expand(*[s if i != dim else positions.shape[1] for i, s in enumerate(states.shape)])
    return states.gather(dim, index.to(states.device))


def _gather_positions(values: Any, positions: torch.Tensor, length: int) -> Any:
    """Rotary embeddings ``(cos, sin)`` or position ids, cut to the kept positions (their original values)."""
    if isinstance(values, tuple):
        return tuple(_gather_positions(value, positions, length) for value in values)
    batch = positions.shape[0]
    if values.dim() == 3 and values.shape[-2] == length:  # (B or 1, L, d) rotary tables
        return _gather(values.expand(batch, -1, -1), positions, dim=1)
    if values.dim() == 2 and values.shape[-1] == length:  # (B or 1, L) position ids
        return _gather(values.expand(batch, -1), positions, dim=1)
    raise ValueError(f"cannot cut position tensor of shape {tuple(values.shape)} to the kept tokens")


def _hide_fillers(
    mask: torch.Tensor | None, filler: torch.Tensor | None, hidden_states: torch.Tensor, past: int, flash: bool
) -> torch.Tensor | None:
    """The attention mask of a later layer with the filler slots of the prompt hidden from every query.

    ``mask`` is the (already cut) mask or None (plain causal attention); ``past`` the tokens the
    layer's cache held before this pass. Without fillers the mask is returned unchanged.
    """
    if filler is None:
        return mask
    batch, queries = hidden_states.shape[:2]
    keys = past + queries
    hidden = torch.zeros(batch, keys, dtype=torch.bool, device=hidden_states.device)
    hidden[:, : filler.shape[1]] = filler.to(hidden.device)
    if mask is not None and mask.dim() == 2:  # FlashAttention: (B, K) real-token mask
        return mask.masked_fill(hidden, 0)
    if mask is None and flash:  # FlashAttention without padding: a 2-D mask of the real keys
        return (~hidden).to(torch.int32)
    if mask is None:
        # Causal attention over the cached keys and the new queries, built explicitly.
        rows = torch.arange(queries, device=hidden.device)[:, None] + past
        blocked = torch.arange(keys, device=hidden.device)[None, :] > rows
        mask = torch.zeros(batch, 1, queries, keys, dtype=hidden_states.dtype, device=hidden.device)
        mask = mask.masked_fill(blocked, torch.finfo(hidden_states.dtype).min)
    if mask.dtype == torch.bool:  # True = may attend
        return mask & ~hidden[:, None, None, :]
    return mask.masked_fill(hidden[:, None, None, :], torch.finfo(mask.dtype).min)


def _cut_mask(mask: torch.Tensor, positions: torch.Tensor, prompt_length: int, rows_too: bool) -> torch.Tensor:
    """An attention mask restricted to the kept prompt columns (and rows, in the prefill) plus every later column."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"language-model pruning supports tensor attention masks, not {type(mask).__name__}")
    total = mask.shape[-1]
    later = torch.arange(prompt_length, total, device=positions.device).expand(positions.shape[0], -1)
    columns = torch.cat([positions, later], dim=1)
    if mask.dim() == 2:  # FlashAttention: (B, K) real-token mask
        return _gather(mask, columns, dim=1)
    if mask.dim() != 4:
        raise ValueError(f"unexpected attention mask of shape {tuple(mask.shape)}")
    mask = mask.expand(positions.shape[0], -1, -1, -1)
    mask = _gather(mask, columns, dim=3)
    if rows_too:
        mask = _gather(mask, positions, dim=2)
    return mask
