"""Qwen2-VL and Qwen2.5-VL family adapter (dynamic resolution, no CLS, M-RoPE).

Two stages, as SPEC §4 defines them for Qwen2-VL. With a budget of ``T`` tokens for an image of
``n`` merged tokens:

1. Encoder stage (``method="flowcut"``): the shared progressive stage runs over the vision blocks on
   2x2 merge groups (see :mod:`flowcut.adapters.qwen_vision`) and keeps ``min(n, 2T)`` groups; the
   tower's merger turns them into as many language-model tokens. The processor writes that many
   image placeholders, so the model's own placeholder check stays on.
2. Language-model stage: after decoder layer 1 each image keeps its best ``T`` tokens (SPEC §3,
   FlowCut score; FastV's attention score for ``method="fastv"``, which skips stage 1).

Positions (M-RoPE). Every kept visual token keeps the (t, h, w) position it has in the unpruned
model and every text token keeps its unpruned position; new tokens continue from the unpruned
prompt's positions. (The authors' code gives the kept tokens the first grid positions instead.)
The positions are computed by the model's own ``get_rope_index`` on the unpruned layout and then
gathered for the tokens that remain. Images of one prompt, and of one batch, are never mixed by
the selection; each image has its own budget, and rows of a batch that keep different numbers of
tokens are padded with hidden filler slots after layer 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from flowcut.adapters.language import DecoderPruner, decoder_pruner, images_key, prompt_layout
from flowcut.adapters.processor import adapt_processor, check_placeholder_count, restore_processor
from flowcut.adapters.qwen_vision import QwenVisionAdapter
from flowcut.config import FlowCutConfig, tokens_to_keep
from flowcut.core.encoder_stage import ImageTrace, run_encoder_stage
from flowcut.core.language_stage import sequential_budgets
from flowcut.methods import available_method
from flowcut.methods.flowcut import stage_settings
from flowcut.trace import PruningTrace

METHODS = ("flowcut", "fastv", "none")
"""Methods available for Qwen models (the others are defined on a CLS-token encoder)."""


@dataclass
class _Prompt:
    """The images of the prompt being processed: their unit grids, budgets and kept units."""

    grid_thw: torch.Tensor
    grids: list[tuple[int, int]]
    budgets: list[int]
    """``T`` per image: tokens that the language model's later layers see."""
    placeholders: list[int]
    """Tokens per image entering the language model (after the encoder stage)."""
    kept_units: list[torch.Tensor] | None = None
    """Per image, the merged-grid indices the encoder kept (None: not encoded yet)."""
    encoder_images: list[ImageTrace] | None = None


class QwenFamily:
    """Installs FlowCut on one Qwen2-VL / Qwen2.5-VL instance and removes it again."""

    model_classes = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)

    def __init__(self, model: torch.nn.Module, config: FlowCutConfig, on_trace: Callable[[PruningTrace], None]):
        self.method = available_method(config.method, METHODS, type(model).__name__)
        self.model = model
        self.config = config
        self.on_trace = on_trace
        self.base = model.model
        self.encoder = QwenVisionAdapter(self.base.visual)
        self.image_token_id = model.config.image_token_id
        self.prompt: _Prompt | None = None
        self._hook = None
        self.pruner: DecoderPruner | None = None
        if self.method.prunes:
            self.pruner = decoder_pruner(
                self.base.language_model,
                self.method.language_layer,
                self._budgets,
                self.method.language_score,
                self._language_trace,
            )

    @property
    def tokens_per_image(self) -> int | float:
        """The budget per image: a token count, or the configured ratio of each image's tokens."""
        return self.config.keep

    # -- budgets ------------------------------------------------------------------------------

    def budget(self, units: int) -> int:
        """``T``: tokens of an image with ``units`` merged tokens that the later decoder layers see."""
        return tokens_to_keep(self.config.keep, units) if self.method.prunes else units

    def placeholders(self, units: int) -> int:
        """Tokens of an image with ``units`` merged tokens that enter the language model."""
        if self.config.method != "flowcut":
            return units
        return min(units, 2 * self.budget(units))

    def _plan(self, image_grid_thw: torch.Tensor) -> _Prompt:
        grids = self.encoder.unit_grids(image_grid_thw, self.encoder.merge_size)
        units = [rows * columns for rows, columns in grids]
        return _Prompt(image_grid_thw, grids, [self.budget(n) for n in units], [self.placeholders(n) for n in units])

    # -- model side -------------------------------------------------------------------------

    def install(self) -> None:
        """Route this instance's image features and positions through FlowCut."""
        family = self
        stock_rope_index = type(self.base).get_rope_index.__get__(self.base)

        def get_image_features(
            pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **kwargs: Any
        ) -> BaseModelOutputWithPooling | tuple:
            """Image features pruned by FlowCut's encoder stage (installed by flowcut.apply on this instance)."""
            return family.image_features(pixel_values, image_grid_thw, **kwargs)

        def get_rope_index(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            """M-RoPE positions of a pruned prompt: the unpruned positions of the tokens that remain."""
            return family.rope_index(stock_rope_index, input_ids, *args, **kwargs)

        self._stock_rope_index = stock_rope_index
        self.base.get_image_features = get_image_features
        self.base.get_rope_index = get_rope_index
        self._hook = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        if self.pruner is not None:
            self.pruner.install()

    def uninstall(self) -> None:
        """Restore the instance exactly as it was before :meth:`install`."""
        self.base.__dict__.pop("get_image_features", None)
        self.base.__dict__.pop("get_rope_index", None)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.pruner is not None:
            self.pruner.remove()
        self.prompt = None

    def image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None, **kwargs: Any
    ) -> BaseModelOutputWithPooling | tuple:
        """FlowCut's replacement for ``get_image_features``: each image's kept merge groups, merged."""
        if image_grid_thw is None:
            raise ValueError("FlowCut's Qwen encoder stage needs image_grid_thw (the processor returns it)")
        prompt = self._plan(image_grid_thw)
        units = [rows * columns for rows, columns in prompt.grids]
        if prompt.placeholders == units:
            # No image is over its encoder budget: the stock tower, bit for bit.
            self.prompt = prompt
            return type(self.base).get_image_features(self.base, pixel_values, image_grid_thw, **kwargs)
        # The merger reads the last block's output: every block runs, the last before it prunes last.
        settings = stage_settings(self.config, max(prompt.placeholders), self.encoder.num_layers - 1)
        with self.encoder.session(image_grid_thw):
            stage = run_encoder_stage(self.encoder, pixel_values, settings, units, prompt.placeholders)
            features = self.encoder.merge(stage.hidden_states, stage.counts)
        prompt.kept_units = [image.kept_indices for image in stage.images]
        prompt.encoder_images = stage.images
        self.prompt = prompt
        output = BaseModelOutputWithPooling(last_hidden_state=stage.hidden_states, pooler_output=tuple(features))
        return output if kwargs.get("return_dict", True) else output.to_tuple()

    def rope_index(
        self,
        stock: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        input_ids: torch.Tensor,
        mm_token_type_ids: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        *args: Any,
        attention_mask: torch.Tensor | None = None,
        kept_units: list[torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``get_rope_index`` for prompts whose images hold fewer placeholders than grid cells.

        The prompt is expanded back to the unpruned layout, the stock function computes the
        positions, and each remaining token takes its own: a kept visual token the position of its
        grid cell (``kept_units``; before the encoder has run, the first cells stand in), every other
        token its unpruned position. The deltas are shifted so new tokens continue the unpruned prompt.
        """
        if image_grid_thw is None or mm_token_type_ids is None:
            return stock(input_ids, mm_token_type_ids, image_grid_thw, *args, attention_mask=attention_mask, **kwargs)
        prompt = self._plan(image_grid_thw)
        self._check_placeholders(input_ids, prompt)
        units = [rows * columns for rows, columns in prompt.grids]
        visible = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        image = ((mm_token_type_ids == 1) & visible).tolist()
        expanded, sources, extra = [], [], []
        next_image = 0
        for b in range(input_ids.shape[0]):
            row_ids, row_types, row_visible = [], [], []
            source = torch.zeros(input_ids.shape[1], dtype=torch.long)
            added, position = 0, 0
            while position < input_ids.shape[1]:
                if not image[b][position]:
                    source[position] = len(row_ids)
                    row_ids.append(int(input_ids[b, position]))
                    row_types.append(int(mm_token_type_ids[b, position]))
                    row_visible.append(bool(visible[b, position]))
                    position += 1
                    continue
                if next_image >= len(units):
                    raise ValueError(f"the prompts hold image placeholders for more than the {len(units)} images given")
                count, cells = prompt.placeholders[next_image], units[next_image]
                if not all(image[b][position : position + count]) or len(image[b][position : position + count]) < count:
                    raise ValueError(f"image {next_image} needs a run of {count} image placeholders in its prompt")
                chosen = torch.arange(count) if kept_units is None else kept_units[next_image].cpu().long()
                source[position : position + count] = len(row_ids) + chosen
                row_ids.extend([self.image_token_id] * cells)
                row_types.extend([1] * cells)
                row_visible.extend([True] * cells)
                added += cells - count
                position += count
                next_image += 1
            expanded.append((row_ids, row_types, row_visible))
            sources.append(source)
            extra.append(added)
        if next_image != len(units):
            raise ValueError(
                f"the prompts hold image placeholders for {next_image} images, but {len(units)} images were given"
            )
        width = max(len(row[0]) for row in expanded)
        device = input_ids.device

        def padded(rows: list[list[Any]], fill: Any, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([row + [fill] * (width - len(row)) for row in rows], dtype=dtype, device=device)

        full_ids = padded([row[0] for row in expanded], 0, input_ids.dtype)
        full_types = padded([row[1] for row in expanded], 0, mm_token_type_ids.dtype)
        full_visible = padded([row[2] for row in expanded], False, torch.long)
        positions, deltas = stock(full_ids, full_types, image_grid_thw, *args, attention_mask=full_visible, **kwargs)
        source = torch.stack(sources).to(device)
        gathered = positions.gather(2, source[None].expand(positions.shape[0], -1, -1))
        gathered = gathered.masked_fill(~visible[None], 0)
        return gathered, deltas + torch.tensor(extra, device=deltas.device, dtype=deltas.dtype)[:, None]

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """Encode the images first (so their kept cells are known), fix the positions, prepare the pruner.

        ``generate`` encodes the images itself (through this instance's ``get_image_features``) before
        the prefill and passes ``mm_encoder_outputs``; a plain forward pass brings ``pixel_values``.
        """
        kwargs = dict(kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        if self.pruner is not None:
            self.pruner.refuse_static_cache(cache, self.config.method)
        if kwargs.get("pixel_values_videos") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("video"):
            raise ValueError(
                "FlowCut's Qwen path prunes images; video inputs are not supported yet (remove the handle to run them)"
            )
        if cache is not None and cache.get_seq_length() > 0:
            return args, kwargs  # decoding: the prompt's pruning is already in place
        if kwargs.get("pixel_values") is not None:
            grid = kwargs.get("image_grid_thw")
            if grid is None:
                raise ValueError("FlowCut's Qwen path needs image_grid_thw (the processor returns it)")
            if input_ids is not None:
                self._check_placeholders(input_ids, self._plan(grid))
            encoded = self.image_features(kwargs["pixel_values"], grid)
            kwargs["pixel_values"] = None
            kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), "image": encoded}
        elif (kwargs.get("mm_encoder_outputs") or {}).get("image") is None:
            self.prompt = None  # a prompt without images
        prompt = self.prompt
        if prompt is not None and input_ids is not None:
            self._check_placeholders(input_ids, prompt)
            if prompt.kept_units is not None:
                self._fix_positions(input_ids, kwargs, prompt)
        language_prunes = prompt is not None and any(
            budget < count for budget, count in zip(prompt.budgets, prompt.placeholders, strict=True)
        )
        if self.pruner is not None:
            if input_ids is None:
                raise ValueError(f"method {self.config.method!r} needs input_ids to find the image tokens")
            layout = prompt_layout(input_ids, kwargs.get("attention_mask"), self.image_token_id, images_key(kwargs))
            self.pruner.start_prefill(layout if layout.visual.any() and language_prunes else None)
        if prompt is not None and prompt.kept_units is None and not (self.pruner is not None and language_prunes):
            self._stock_trace(prompt)
        return args, kwargs

    def _fix_positions(self, input_ids: torch.Tensor, kwargs: dict[str, Any], prompt: _Prompt) -> None:
        """Give the kept visual tokens their own grid positions (M-RoPE) in this pass's position ids."""
        token_types = kwargs.get("mm_token_type_ids")
        if token_types is None:
            raise ValueError("Qwen's M-RoPE positions need mm_token_type_ids (the processor returns them)")
        positions, deltas = self.rope_index(
            self._stock_rope_index,
            input_ids,
            token_types,
            prompt.grid_thw,
            attention_mask=kwargs.get("attention_mask"),
            kept_units=prompt.kept_units,
        )
        given = kwargs.get("position_ids")
        if given is not None and given.dim() == 3 and given.shape[0] == 4:
            positions = torch.cat([given[:1], positions.to(given.device)], dim=0)  # row 0: text positions for masks
        kwargs["position_ids"] = positions
        self.base.rope_deltas = deltas

    def _check_placeholders(self, input_ids: torch.Tensor, prompt: _Prompt) -> None:
        """Explain a placeholder count that was made for the unpruned model before the model's own check fails."""
        placeholders = int((input_ids == self.image_token_id).sum())
        stock = sum(rows * columns for rows, columns in prompt.grids)
        check_placeholder_count(placeholders, sum(prompt.placeholders), stock)

    def _budgets(self, visual: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
        """Per row, the placeholder count and budget of each of its images (images in batch order)."""
        if self.prompt is None:
            raise RuntimeError("the language-model stage ran without the images' grids (pass image_grid_thw)")
        return sequential_budgets(visual, self.prompt.placeholders, self.prompt.budgets)

    # -- traces -------------------------------------------------------------------------------

    def _stock_trace(self, prompt: _Prompt) -> None:
        layers = self.encoder.num_layers
        images = [
            ImageTrace(torch.arange(rows * columns), [rows * columns] * layers, [], [None] * layers)
            for rows, columns in prompt.grids
        ]
        tokens = [(rows * columns,) * 3 for rows, columns in prompt.grids]
        trace = PruningTrace(images, prompt.grids[0], self.config.keep, layers - 1, image_grids=prompt.grids)
        trace.image_tokens = tokens
        self.on_trace(trace)

    def _language_trace(self, positions: torch.Tensor, kept: list[torch.Tensor]) -> None:
        """Trace of a language-model prune: each image's surviving tokens as merged-grid cells."""
        prompt = self.prompt
        layers = self.encoder.num_layers
        images = []
        for image, mask in enumerate(kept):
            cells = torch.arange(len(mask)) if prompt.kept_units is None else prompt.kept_units[image]
            survivors = cells[mask.cpu()]
            if prompt.encoder_images is None:
                units = prompt.grids[image][0] * prompt.grids[image][1]
                images.append(ImageTrace(survivors, [units] * layers, [], [None] * layers))
            else:
                images.append(replace(prompt.encoder_images[image], kept_indices=survivors))
        tokens = [
            (rows * columns, count, len(image.kept_indices))
            for (rows, columns), count, image in zip(prompt.grids, prompt.placeholders, images, strict=True)
        ]
        self.on_trace(
            PruningTrace(
                images, prompt.grids[0], self.config.keep, layers - 1, positions, tokens, image_grids=prompt.grids
            )
        )

    # -- processor side ---------------------------------------------------------------------

    def patch_processor(self, processor: Any) -> None:
        """Make ``processor`` write each image's pruned placeholder count (instance-level, reversible)."""
        adapt_processor(processor, self.image_token_id, "Qwen2-VL", lambda units, size: self.placeholders(units))

    unpatch_processor = staticmethod(restore_processor)
