"""Encoder-stage adapters for ViT towers run layer by layer: CLIP (CLS token at slot 0), SigLIP (no CLS), and
any of them on square cells of patches (the groups a projector turns into one token)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from flowcut import compat
from flowcut.core.encoder_stage import AttentionRecord, AttentionRecorder, ImageTrace
from flowcut.core.scoring import (
    CriteriaScores,
    cls_criteria,
    global_query_criteria,
    group_criteria,
    grouped,
    received_attention,
)
from flowcut.runtime.attention import attention_context, key_padding_mask, recording_attention, resolve_attention
from flowcut.runtime.family import EncoderWork


def feature_layer_index(vision_feature_layer: Any, num_layers: int) -> int:
    """0-based index of the encoder layer whose output ``hidden_states[vision_feature_layer]`` is."""
    if isinstance(vision_feature_layer, (list, tuple)) and len(vision_feature_layer) == 1:
        vision_feature_layer = vision_feature_layer[0]  # one layer in a list: the same features as the int
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


class ClipEncoderAdapter:
    """Runs a ``CLIPVisionModel`` layer by layer for the encoder stage."""

    query_slots = 1
    """CLS sits at slot 0 and scores the patches."""
    eager_attention = staticmethod(compat.clip_eager_attention)
    tower_class = compat.CLIPVisionModel
    embeddings_class = compat.CLIPVisionEmbeddings
    layer_class = compat.CLIPEncoderLayer
    attention_attribute = "self_attn"
    """The attribute of a layer that holds its attention module."""

    def __init__(self, vision_tower: torch.nn.Module) -> None:
        if not isinstance(vision_tower, self.tower_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.tower_class.__name__} vision tower, "
                f"got {type(vision_tower).__name__}"
            )
        self.vision_tower = vision_tower
        self.embeddings = next(m for m in vision_tower.modules() if isinstance(m, self.embeddings_class))
        self.layers = [m for m in vision_tower.modules() if isinstance(m, self.layer_class)]
        self.attention_configs = list(
            {id(attention.config): attention.config for attention in map(self.attention, self.layers)}.values()
        )
        self._attention = None
        self._implementation: str | None = None
        """Set only on the pass adapter :meth:`session` yields."""

    @property
    def num_layers(self) -> int:
        """Number of encoder layers."""
        return len(self.layers)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image at the configured image size."""
        return self.embeddings.num_patches

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns)."""
        side = self.embeddings.image_size // self.embeddings.patch_size
        return side, side

    @contextmanager
    def session(self) -> Iterator[ClipEncoderAdapter]:
        """One pass: route the tower's attention through the recorder and restore it afterwards.

        Yields the pass's adapter, a copy bound to the attention implementation of this pass; this
        adapter itself holds nothing of the pass.
        """
        bound = copy.copy(self)
        bound._implementation = compat.attention_implementation(self.attention_configs[0])
        bound._attention = resolve_attention(bound._implementation, self.eager_attention)
        with recording_attention(self.attention_configs):
            yield bound

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + CLS embeddings after the pre-layer norm, as ``CLIPVisionModel.forward`` computes them."""
        return self.vision_tower.pre_layrnorm(self.embeddings(pixel_values))

    def run_layer(
        self,
        index: int,
        hidden_states: torch.Tensor,
        alive: torch.Tensor | None,
        recorder: AttentionRecorder | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run layer ``index`` with its own attention implementation, recording q/k/v when asked.

        CLIP's position embeddings were added at the input, so ``positions`` is not needed.
        """
        if self._attention is None:
            raise RuntimeError("run_layer needs the adapter ClipEncoderAdapter.session() yields")
        mask = None if alive is None else key_padding_mask(alive, self._implementation, hidden_states.dtype)
        layer = self.layers[index]
        with attention_context(self.attention(layer), recorder, self._attention, self._implementation):
            return compat.run_vision_layer(layer, hidden_states, mask)

    def attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        """A layer's attention module."""
        return getattr(layer, self.attention_attribute)

    def criteria(self, record: AttentionRecord, alive: torch.Tensor | None) -> CriteriaScores:
        """CLS-view criteria (SPEC §2 steps 1–3)."""
        return cls_criteria(record.query, record.key, record.value, record.scaling, alive)

    def unit_keys(self, record: AttentionRecord, alive: torch.Tensor | None) -> torch.Tensor:
        """Each patch's key averaged over heads, ``(B, N, d)`` (query slots excluded)."""
        return record.key.mean(dim=1)[:, self.query_slots :]

    def received_attention(self, record: AttentionRecord, alive: torch.Tensor | None) -> torch.Tensor:
        """The attention each patch receives from every token (CLS included), head-averaged: ``(B, N)``."""
        return received_attention(record.query, record.key, record.scaling, alive)[:, self.query_slots :]


class SiglipEncoderAdapter(ClipEncoderAdapter):
    """Runs a ``SiglipVisionModel`` (no CLS token) layer by layer; patches are scored from the global token."""

    query_slots = 0
    eager_attention = staticmethod(compat.siglip_eager_attention)
    tower_class = compat.SiglipVisionModel
    embeddings_class = compat.SiglipVisionEmbeddings
    layer_class = compat.SiglipEncoderLayer

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embeddings with position embeddings, as ``SiglipVisionTransformer`` computes them."""
        return self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))

    def criteria(self, record: AttentionRecord, alive: torch.Tensor | None) -> CriteriaScores:
        """Global-token criteria (SPEC §4): the mean query attends over every alive key; score ``a · n``."""
        return global_query_criteria(record.query, record.key, record.value, record.scaling, alive)


class GroupedPatchAdapter:
    """A ViT adapter whose units are square cells of ``side × side`` patches: the groups a tower's
    projector turns into one token (Gemma 3's pooling cells, InternVL's pixel-shuffle groups).

    A unit's state is its patches' states side by side, patches row-major within the cell, cells
    row-major over the grid: the order in which Gemma 3's pooling averages and InternVL's pixel
    shuffle concatenates them. Each layer runs the patch adapter on the alive cells' patches; a
    query token (CLS) keeps its slot, padded to the unit width. Scores of a cell are its patches'
    (attention summed, density averaged), its key their mean key.
    """

    def __init__(self, patches: ClipEncoderAdapter, cell_side: int) -> None:
        side = patches.grid_size[0]
        if side % cell_side or patches.grid_size[1] != side:
            raise ValueError(f"a {patches.grid_size} patch grid does not form cells of {cell_side}×{cell_side}")
        self.patches, self.cell_side, self.group = patches, cell_side, cell_side**2
        self.query_slots = patches.query_slots

    @property
    def num_layers(self) -> int:
        return self.patches.num_layers

    @property
    def grid_size(self) -> tuple[int, int]:
        """The cell grid (rows, columns)."""
        side = self.patches.grid_size[0] // self.cell_side
        return side, side

    @property
    def num_patches(self) -> int:
        """Units (cells) per view."""
        return self.grid_size[0] * self.grid_size[1]

    @contextmanager
    def session(self) -> Iterator[GroupedPatchAdapter]:
        """One pass: the patch adapter's session, grouped."""
        with self.patches.session() as bound:
            yield GroupedPatchAdapter(bound, self.cell_side)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The patch adapter's embeddings grouped into cells: ``(B, query_slots + N, side²·D)``."""
        tokens = self.patches.embed(pixel_values)
        lead, (batch, _, dim) = self.query_slots, tokens.shape
        cells, side = self.grid_size[0], self.cell_side
        grid = tokens[:, lead:].reshape(batch, cells, side, cells, side, dim).permute(0, 1, 3, 2, 4, 5)
        units = grid.reshape(batch, cells * cells, self.group * dim)
        query = torch.cat([tokens[:, :lead], tokens.new_zeros(batch, lead, (self.group - 1) * dim)], dim=-1)
        return torch.cat([query, units], dim=1)

    def run_layer(
        self,
        index: int,
        hidden_states: torch.Tensor,
        alive: torch.Tensor | None,
        recorder: AttentionRecorder | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run layer ``index`` on the query token and every alive cell's patches (positions were added at the input)."""
        lead, (batch, slots, unit_dim) = self.query_slots, hidden_states.shape
        dim = unit_dim // self.group
        patches = hidden_states[:, lead:].reshape(batch, (slots - lead) * self.group, dim)
        tokens = torch.cat([hidden_states[:, :lead, :dim], patches], dim=1)
        output = self.patches.run_layer(index, tokens, self._patch_alive(alive), recorder)
        result = hidden_states.new_zeros(hidden_states.shape)
        result[:, :lead, :dim] = output[:, :lead]
        result[:, lead:] = output[:, lead:].reshape(batch, slots - lead, unit_dim)
        return result

    def _patch_alive(self, alive: torch.Tensor | None) -> torch.Tensor | None:
        if alive is None:
            return None
        lead = self.query_slots
        return torch.cat([alive[:, :lead], alive[:, lead:].repeat_interleave(self.group, dim=1)], dim=1)

    def criteria(self, record: AttentionRecord, alive: torch.Tensor | None) -> CriteriaScores:
        """The patch adapter's criteria (CLS or global token), grouped into cells."""
        return group_criteria(self.patches.criteria(record, self._patch_alive(alive)), self.group)

    def received_attention(self, record: AttentionRecord, alive: torch.Tensor | None) -> torch.Tensor:
        """The attention each cell's patches receive together from every token: ``(B, N)``."""
        return grouped(self.patches.received_attention(record, self._patch_alive(alive)), self.group)

    def unit_keys(self, record: AttentionRecord, alive: torch.Tensor | None) -> torch.Tensor:
        """Each cell's key: its patches' keys averaged over heads and over the cell, ``(B, N, d)``."""
        keys = self.patches.unit_keys(record, self._patch_alive(alive))
        batch, patches, head_dim = keys.shape
        return keys.view(batch, patches // self.group, self.group, head_dim).mean(dim=2)

    def cell_patches(self, units: torch.Tensor) -> torch.Tensor:
        """Unit states ``(B, N, side²·D)`` (query slots excluded) as their patches' states, ``(B, N, side², D)``."""
        batch, slots, unit_dim = units.shape
        return units.reshape(batch, slots, self.group, unit_dim // self.group)


def vision_adapter(vision_tower: torch.nn.Module) -> ClipEncoderAdapter:
    """The encoder-stage adapter for a vision tower: CLIP (CLS token) or SigLIP (global token)."""
    for adapter in (ClipEncoderAdapter, SiglipEncoderAdapter):
        if isinstance(vision_tower, adapter.tower_class):
            return adapter(vision_tower)
    supported = "CLIPVisionModel and SiglipVisionModel"
    raise TypeError(f"FlowCut's encoder stage supports {supported} towers, got {type(vision_tower).__name__}")


def vit_encoder_work(model: torch.nn.Module, traced: list[ImageTrace], passes: int, crops: bool) -> EncoderWork:
    """The work of ``passes`` ViT passes (traced ones as their traces say, the rest over every patch).

    ``crops``: anyres crops are projected before unpadding and newlines, so the projector maps the units
    the passes hand on; otherwise it maps the tokens entering the language model.
    """
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    layers = [trace.tokens_per_layer for trace in traced] or [[patches] * vision.num_hidden_layers] * passes
    if not crops:
        return layers, None
    return layers, sum(trace.units_handed_on for trace in traced) if traced else passes * patches


def frames_encoder_work(model: torch.nn.Module, trace: Any, inputs: Any) -> EncoderWork:
    """One image, or a video frame by frame, through a ViT."""
    videos = inputs.get("pixel_values_videos")
    if videos is not None:
        traced = ((trace.videos or [[]])[0] or []) if trace is not None else []  # None: the stock path
        return vit_encoder_work(model, traced, videos.shape[1], crops=False)
    return vit_encoder_work(model, trace.images[:1] if trace is not None else [], 1, crops=False)
