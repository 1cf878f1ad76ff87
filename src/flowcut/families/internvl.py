"""InternVL (``InternVLForConditionalGeneration``: InternViT with CLS, pixel shuffle, dynamic tiles).

How the paper's method maps onto it. An image is cut into up to 12 tiles of 448 px plus a
thumbnail of the whole image; each tile is one fixed-size view of 32×32 patches, and the pixel
shuffle concatenates each 2×2 group of patches into one of the tile's 256 tokens. So:

- **Units are 2×2 shuffle groups**, pruned whole, so every kept token is a real group of
  neighbours (the shuffle of a pruned grid would mix patches of different places).
- **CLS scores**: InternViT has a CLS token at slot 0, so the encoder stage scores by CLS exactly as
  for LLaVA-1.5 (SPEC §2); a group's relation is the attention its patches receive together.
- **Per tile**: ``keep`` is each tile's (and the thumbnail's) budget ``T``. The language model sees
  an image as one run of its tiles' tokens and cannot tell how many tiles it holds, so a budget per
  image could not be found from the prompt; per tile, every tile keeps its place in the image's
  structure and an image of ``n`` views keeps ``n·T`` tokens.
- **Two stages**, as for the other many-token families (SPEC §4): FlowCut keeps ``2T`` groups per
  tile in the encoder and ``T`` per tile after decoder layer 1; the other encoder methods keep ``T``
  in the encoder; FastV prunes each tile's 256 tokens to ``T`` after layer 1.

Videos: InternVL writes a video as its frames, each an image of one view with ``FrameN:`` text before
it, and hands the frames to the model as images; each frame keeps ``keep`` as every view does.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import InternVLForConditionalGeneration

from flowcut import compat
from flowcut.families.clip import ClipEncoderAdapter, GroupedPatchAdapter, check_select_strategy
from flowcut.families.views import FixedViewFamily
from flowcut.runtime.attention import attention_context, key_padding_mask
from flowcut.runtime.processor import adapt_processor


class InternVitAdapter(ClipEncoderAdapter):
    """Runs an ``InternVLVisionModel`` (CLS at slot 0, no pre-norm) layer by layer."""

    eager_attention = staticmethod(compat.internvl_eager_attention)
    tower_class = compat.InternVLVisionModel
    embeddings_class = compat.InternVLVisionEmbeddings
    layer_class = compat.InternVLVisionLayer
    attention_attribute = "attention"

    @property
    def grid_size(self) -> tuple[int, int]:
        config = self.vision_tower.config
        sizes, patches = config.image_size, config.patch_size
        sizes = sizes if isinstance(sizes, (list, tuple)) else (sizes, sizes)
        patches = patches if isinstance(patches, (list, tuple)) else (patches, patches)
        return sizes[0] // patches[0], sizes[1] // patches[1]

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLS and patch embeddings with position embeddings, as ``InternVLVisionModel.forward`` computes them."""
        return self.embeddings(pixel_values.to(self.embeddings.cls_token.dtype))

    def run_layer(
        self,
        index: int,
        hidden_states: torch.Tensor,
        alive: torch.Tensor | None,
        recorder: Any,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run layer ``index``; its attention gets the padding mask through FlowCut's context (the layer takes none)."""
        if self._attention is None:
            raise RuntimeError("run_layer needs the adapter InternVitAdapter.session() yields")
        mask = None if alive is None else key_padding_mask(alive, self._implementation, hidden_states.dtype)
        layer = self.layers[index]
        with attention_context(self.attention(layer), recorder, self._attention, self._implementation, mask):
            return compat.run_maskless_vision_layer(layer, hidden_states)


class InternVLFamily(FixedViewFamily):
    """Installs FlowCut on one ``InternVLForConditionalGeneration`` instance and removes it again."""

    model_classes = (InternVLForConditionalGeneration,)
    family_name = "InternVL"

    def grouped_tower(self) -> GroupedPatchAdapter:
        return GroupedPatchAdapter(
            InternVitAdapter(self.base.vision_tower), round(1 / self.model.config.downsample_ratio)
        )

    def tokens_per_view(self) -> int:
        side = self.encoder.patches.grid_size[0] * self.model.config.downsample_ratio
        return round(side) ** 2

    def feature_arguments(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
        }

    def check_feature_arguments(self, arguments: dict[str, Any]) -> None:
        if arguments["vision_feature_layer"] != -1:
            raise ValueError(
                "FlowCut's InternVL path takes the last layer's features (vision_feature_layer=-1), got "
                f"vision_feature_layer={arguments['vision_feature_layer']!r}"
            )
        check_select_strategy(arguments["vision_feature_select_strategy"])

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """As the stock model makes a group's token: the tower's final norm per patch, the group's patches side by
        side (the pixel shuffle's order), the projector."""
        patches = compat.internvl_final_norm(self.base.vision_tower)(self.encoder.cell_patches(hidden_states))
        return self.base.multi_modal_projector(patches.flatten(2))

    def patch_processor(self, processor: Any) -> None:
        """Images as for every family, a video's frames as images (each a view of its own)."""
        image = self.processor_image
        # Its counter counts each image's start and end markers with the placeholders.
        adapt_processor(
            processor, self.patch, self.image_token_id, self.family_name, image, None, 2, frames_as_images=True
        )
