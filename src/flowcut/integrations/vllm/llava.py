"""FlowCut variant of vLLM's LLaVA-1.5 model (``FlowCutLlavaForConditionalGeneration``).

Two things change against vLLM's ``LlavaForConditionalGeneration``, nothing else:

- the processing info reports ``keep`` placeholder tokens per image (instead of 576), so vLLM reserves
  exactly ``keep`` positions in the prompt and the KV cache;
- the vision tower is run through FlowCut's encoder stage (:func:`flowcut.core.encoder_stage.run_encoder_stage`)
  with :class:`~flowcut.integrations.vllm.encoder.VllmClipEncoderAdapter` over vLLM's own CLIP layers,
  so the multimodal embedding returns exactly ``keep`` projected patches per image.

vLLM builds the vision tower only up to the feature layer, so the layers after it do not exist.
The budget comes from the model config: ``--hf-overrides '{"architectures":
["FlowCutLlavaForConditionalGeneration"], "flowcut_keep": 64}'``.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from flowcut.config import FlowCutConfig, tokens_to_keep, validate_keep
from flowcut.core.encoder_stage import EncoderStageSettings, run_encoder_stage
from flowcut.families.clip import check_select_strategy, feature_layer_index
from flowcut.integrations.vllm import FLOWCUT_LLAVA_ARCHITECTURE
from flowcut.integrations.vllm.encoder import VllmClipEncoderAdapter
from flowcut.methods.flowcut import stage_settings

KEEP_OVERRIDE = "flowcut_keep"
"""The model-config attribute (set with ``--hf-overrides``) holding FlowCut's budget."""


def flowcut_keep(hf_config: Any) -> int:
    """The number of visual tokens per image the served model keeps, validated against the CLIP patch grid.

    ``flowcut_keep`` is a positive integer below the patch count, or a ratio in (0, 1) of the patches.
    """
    vision_config = getattr(hf_config, "vision_config", None)
    if getattr(vision_config, "model_type", None) != "clip_vision_model":
        raise ValueError(
            f"{FLOWCUT_LLAVA_ARCHITECTURE} serves LLaVA-1.5 checkpoints with a CLIP vision tower, "
            f"got vision model type {getattr(vision_config, 'model_type', None)!r}"
        )
    keep = getattr(hf_config, KEEP_OVERRIDE, None)
    if keep is None:
        raise ValueError(
            f"{FLOWCUT_LLAVA_ARCHITECTURE} needs the number of visual tokens to keep per image: pass "
            f'--hf-overrides \'{{"architectures": ["{FLOWCUT_LLAVA_ARCHITECTURE}"], "{KEEP_OVERRIDE}": 64}}\' '
            f'(or hf_overrides={{..., "{KEEP_OVERRIDE}": 64}} in LLM(...))'
        )
    keep = validate_keep(keep)
    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    budget = keep if isinstance(keep, int) else tokens_to_keep(keep, num_patches)
    if budget >= num_patches:
        raise ValueError(
            f"{KEEP_OVERRIDE}={keep} does not prune: this model has {num_patches} patches per image. "
            f"Use a smaller budget, or serve the stock LlavaForConditionalGeneration for the unpruned model"
        )
    return budget


def flowcut_stage_settings(hf_config: Any) -> EncoderStageSettings:
    """The encoder-stage settings of a served model: its budget and feature layer, the paper's schedule."""
    keep = flowcut_keep(hf_config)
    check_select_strategy(hf_config.vision_feature_select_strategy)
    feature_layer = feature_layer_index(hf_config.vision_feature_layer, hf_config.vision_config.num_hidden_layers)
    return stage_settings(FlowCutConfig(keep=keep), keep, feature_layer)


class FlowCutLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA-1.5 processing info that reserves ``keep`` placeholder tokens per image."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        # Every image is resized to the CLIP input size, so the count does not depend on the image size.
        return flowcut_keep(self.get_hf_config())


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor,
    info=FlowCutLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class FlowCutLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 whose image embeddings are the ``keep`` patches FlowCut's encoder stage selects."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        # Validate before building anything, so a bad setting fails with its own message.
        settings = flowcut_stage_settings(hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.flowcut_settings = settings
        if not isinstance(self.vision_tower, CLIPVisionModel):
            raise TypeError(f"{FLOWCUT_LLAVA_ARCHITECTURE} needs a CLIP vision tower")
        attention = self.vision_tower.vision_model.encoder.layers[0].self_attn
        heads_split = attention.num_heads_per_partition != attention.num_heads
        self.flowcut_encoder = VllmClipEncoderAdapter(
            self.vision_tower.vision_model, tensor_model_parallel_all_reduce if heads_split else None
        )
        if self.flowcut_encoder.num_layers != self.flowcut_settings.feature_layer + 1:
            raise ValueError(
                f"vLLM built {self.flowcut_encoder.num_layers} vision layers, expected the feature layer "
                f"{self.flowcut_settings.feature_layer} to be the last"
            )
        self.flowcut_last_kept_indices: list[torch.Tensor] = []
        """Kept patch indices (row-major over the patch grid, ascending) of each image of the last encoder call."""

    def _image_pixels_to_features(self, vision_tower: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ``keep`` surviving patches of the feature layer per image, ``(B, keep, D_vision)``, CLS dropped."""
        stage = run_encoder_stage(self.flowcut_encoder, pixel_values, self.flowcut_settings)
        self.flowcut_last_kept_indices = [image.kept_indices for image in stage.images]
        return stage.hidden_states[:, 1:]


def last_kept_indices(model: torch.nn.Module) -> list[list[int]]:
    """The kept patch indices of each image of the model's last encoder call (for ``LLM.apply_model``).

    ``llm.apply_model(last_kept_indices)`` returns one list per worker (tensor-parallel rank); a
    module-level function, so vLLM can send it to its worker processes by reference.
    """
    if not isinstance(model, FlowCutLlavaForConditionalGeneration):
        raise TypeError(f"expected a {FLOWCUT_LLAVA_ARCHITECTURE}, got {type(model).__name__}")
    return [indices.tolist() for indices in model.flowcut_last_kept_indices]
