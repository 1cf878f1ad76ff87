"""The one module that reaches into transformers internals.

FlowCut hooks a model instance at a few seams that transformers does not promise to keep stable:
the names of the keyword arguments decoder layers receive, the cache object's API, how attention
implementations are selected and registered, the fields of the models' output dataclasses, helper
functions of individual model files, and the processors' placeholder counting. Every such access
lives here, each behind one small function, and each has a canary test (``tests/test_compat.py``)
that exercises exactly that seam on a tiny model and names the seam and the transformers version
when it fails. When a transformers release moves something, this file is the place to mend.

``VERIFIED_TRANSFORMERS`` is the range CI runs the whole suite on (both ends); ``pyproject.toml``
allows exactly this range, and :func:`check_transformers_version` warns once when the installed
version lies outside it (e.g. installed with ``--no-deps``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip import modeling_clip
from transformers.models.internvl import modeling_internvl
from transformers.models.llava_next import modeling_llava_next
from transformers.models.qwen3_vl import modeling_qwen3_vl
from transformers.models.siglip import modeling_siglip
from transformers.video_utils import VideoMetadata as VideoMetadata  # for flowcut.testing
from transformers.video_utils import make_batched_videos as make_batched_videos  # for flowcut.testing
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

TRANSFORMERS_VERSION: str = transformers.__version__

OLDEST_VERIFIED = (5, 21)
"""The oldest transformers minor CI runs the whole suite on (its first release, 5.21.0).

5.20 is not supported: its ``VideoLlavaProcessor`` reads ``pixel_values_images``, which the CLIP image
processors do not return, so a Video-LLaVA prompt with an image fails there with or without FlowCut.
"""
FIRST_UNVERIFIED = (5, 25)
"""The first transformers minor CI has not run: the upper bound of the supported range."""
VERIFIED_TRANSFORMERS = f">={OLDEST_VERIFIED[0]}.{OLDEST_VERIFIED[1]},<{FIRST_UNVERIFIED[0]}.{FIRST_UNVERIFIED[1]}"
"""The supported range as a requirement specifier (the same string as in ``pyproject.toml``)."""


class UnverifiedTransformersWarning(UserWarning):
    """The installed transformers lies outside the range FlowCut's CI has verified."""


def is_verified(version: str | None = None) -> bool:
    """Whether a transformers version (default: the installed one) lies in :data:`VERIFIED_TRANSFORMERS`."""
    # Pre-releases count as their release: 5.25.0.dev0 is 5.25, outside; 5.24.0rc1 is 5.24, inside.
    release = Version(TRANSFORMERS_VERSION if version is None else version).release[:2]
    return OLDEST_VERIFIED <= release < FIRST_UNVERIFIED


_warned: set[str] = set()


def check_transformers_version(version: str | None = None) -> bool:
    """Warn once per process and version when transformers (default: the installed one) lies outside the
    verified range; True when inside."""
    version = TRANSFORMERS_VERSION if version is None else version
    if is_verified(version):
        return True
    if version not in _warned:
        _warned.add(version)
        warnings.warn(
            f"flowcut-vlm is verified with transformers {VERIFIED_TRANSFORMERS}; transformers {version} is installed. "
            "FlowCut hooks transformers internals (flowcut/compat.py), so results may be wrong or fail: install a "
            f"verified version (pip install 'transformers{VERIFIED_TRANSFORMERS}'), or run the test suite on this "
            "one and report what fails in flowcut-vlm's issue tracker, with this version.",
            UnverifiedTransformersWarning,
            stacklevel=3,
        )
    return False


class SeamError(RuntimeError):
    """A transformers internal FlowCut relies on is not where it expects it (raised with the seam's name)."""


def seam_error(seam: str, detail: str) -> SeamError:
    """An error that names the seam and the installed transformers version, for messages and canary tests."""
    return SeamError(
        f"transformers seam {seam!r} ({detail}) with transformers {TRANSFORMERS_VERSION}; "
        f"flowcut-vlm is verified with transformers {VERIFIED_TRANSFORMERS}"
    )


# -- KV cache --------------------------------------------------------------------------------------

CACHE_ARGUMENTS = ("cache", "past_key_values")
"""Names a model or decoder layer receives its KV cache under: ``cache`` since 5.24, ``past_key_values`` before."""


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache in a model's or decoder layer's keyword arguments (None: no cache)."""
    for name in CACHE_ARGUMENTS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries (``cache`` since 5.24, ``past_key_values`` before)."""
    for name in CACHE_ARGUMENTS:
        cache = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def cache_length(cache: Any, layer: int = 0) -> int:
    """Tokens a cache holds for one decoder layer (layer 0: the length the model derives positions from)."""
    return 0 if cache is None else int(cache.get_seq_length(layer))


def is_static_cache(cache: Any) -> bool:
    """Whether a cache has a fixed length (static, compileable caches), which pruned prompts cannot use."""
    return bool(getattr(cache, "is_compileable", False))


# -- attention implementations ---------------------------------------------------------------------


def attention_implementation(config: Any) -> str | None:
    """The attention implementation a (sub-)config selects (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, …)."""
    return config._attn_implementation


def set_attention_implementation(config: Any, implementation: str | None) -> None:
    """Select an attention implementation on one config object (its modules read it at every call)."""
    config._attn_implementation = implementation


def register_attention(name: str, function: Callable[..., Any]) -> None:
    """Register an attention function under ``name`` with transformers' ``AttentionInterface``."""
    AttentionInterface.register(name, function)


def attention_function(implementation: str, eager: Callable[..., Any]) -> Callable[..., Any]:
    """The function registered for an attention implementation (``eager`` where none is registered)."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


def eager_attention(attention_module: torch.nn.Module) -> Callable[..., Any]:
    """The eager attention function of an attention module's own modelling file."""
    function = getattr(sys.modules[type(attention_module).__module__], "eager_attention_forward", None)
    if function is None:
        raise seam_error("eager_attention_forward", f"{type(attention_module).__module__} defines none")
    return function


# -- decoder layers --------------------------------------------------------------------------------


def layer_hidden_states(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a decoder layer is called with (first positional argument, or by name)."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output_states(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (alone, or first in a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_layer_output_states(output: Any, hidden_states: torch.Tensor) -> Any:
    """A decoder layer's output with its hidden states replaced, in the layer's own output form."""
    return (hidden_states, *output[1:]) if isinstance(output, tuple) else hidden_states


def layer_index(attention_module: torch.nn.Module) -> int:
    """The index of a decoder layer's attention module in the cache (``layer_idx``)."""
    return attention_module.layer_idx


def run_vision_layer(layer: torch.nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Run one CLIP/SigLIP encoder layer on ``(B, N, D)`` states with an optional padding mask."""
    return layer_output_states(layer(hidden_states, mask))


def run_maskless_vision_layer(layer: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Run one InternViT layer, which takes no attention mask (its attention gets one through FlowCut's context)."""
    return layer_output_states(layer(hidden_states))


# -- model outputs ---------------------------------------------------------------------------------


EncoderOutput = BaseModelOutputWithPooling
"""What ``get_*_features`` return; ``generate`` passes it back to the model in ``mm_encoder_outputs``."""


def encoder_output(**fields: Any) -> BaseModelOutputWithPooling:
    """A ``get_*_features`` result (``pooler_output``: the projected features, per item)."""
    return BaseModelOutputWithPooling(**fields)


def _concatenated(features: Any) -> torch.Tensor | None:
    if features is None or isinstance(features, torch.Tensor):
        return features
    return torch.cat([feature.reshape(-1, feature.shape[-1]) for feature in features], dim=0)


def output_image_features(output: Any) -> torch.Tensor | None:
    """The projected image features a LLaVA-style model output carries, ``(tokens, D)`` over all images.

    Since 5.24 outputs carry the encoder's own output (``image_outputs.pooler_output``, per image);
    before, ``image_hidden_states`` (concatenated).
    """
    if "image_outputs" in getattr(type(output), "__dataclass_fields__", {}):
        encoded = output.image_outputs
        return None if encoded is None else _concatenated(encoded.pooler_output)
    return _concatenated(output.image_hidden_states)


# -- modelling helpers of individual model files ---------------------------------------------------

CLIPVisionModel = modeling_clip.CLIPVisionModel
CLIPVisionEmbeddings = modeling_clip.CLIPVisionEmbeddings
CLIPEncoderLayer = modeling_clip.CLIPEncoderLayer
SiglipVisionModel = modeling_siglip.SiglipVisionModel
SiglipVisionEmbeddings = modeling_siglip.SiglipVisionEmbeddings
SiglipEncoderLayer = modeling_siglip.SiglipEncoderLayer
clip_eager_attention = modeling_clip.eager_attention_forward
siglip_eager_attention = modeling_siglip.eager_attention_forward
InternVLVisionModel = modeling_internvl.InternVLVisionModel
InternVLVisionEmbeddings = modeling_internvl.InternVLVisionEmbeddings
InternVLVisionLayer = modeling_internvl.InternVLVisionLayer
internvl_eager_attention = modeling_internvl.eager_attention_forward


def internvl_final_norm(vision_tower: torch.nn.Module) -> torch.nn.Module:
    """The norm ``InternVLVisionModel`` applies to its last layer's output (an identity with mean pooling)."""
    return vision_tower.layernorm


anyres_grid_shape = modeling_llava_next.get_anyres_image_grid_shape
"""LLaVA-NeXT: (rows, columns) of crops an image size is tiled into."""
anyres_crop_count = modeling_llava_next.image_size_to_num_patches
"""LLaVA-NeXT: encoder passes (crops plus the base image) for an image size."""
unpad_image = modeling_llava_next.unpad_image
"""LLaVA-NeXT: a feature grid cut back to the image's aspect ratio."""


vision_position_ids = get_vision_position_ids
"""Qwen-VL: the (row, column) rotary position of every patch, in the tower's merge-group order."""

DeepstackEncoderOutput = modeling_qwen3_vl.BaseModelOutputWithDeepstackFeatures
"""Qwen3-VL's ``get_image_features`` output: the pooled output and ``deepstack_features`` (per layer, per item)."""


def interpolated_position_embeddings(visual: torch.nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's learned position grid resampled to each item's patch grid, in the tower's packed order."""
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid_thw,
        num_grid_per_side=visual.num_grid_per_side,
        mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners,
        spatial_merge_size=visual.config.spatial_merge_size,
    )
    return (visual.pos_embed(indices) * weights[:, :, None]).sum(1)


def deepstack_layers(visual: torch.nn.Module) -> list[int]:
    """The vision blocks whose outputs DeepStack hands to the first decoder layers ([] for towers without)."""
    return sorted(set(getattr(visual, "deepstack_visual_indexes", None) or []))  # the order the tower emits them


def deepstack_merger(visual: torch.nn.Module, block: int) -> torch.nn.Module:
    """The merger DeepStack applies to vision block ``block``'s output."""
    return visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(block)]


def siglip_post_layernorm(vision_tower: torch.nn.Module) -> torch.nn.Module:
    """The norm ``SiglipVisionModel`` applies to its last layer's output (its ``last_hidden_state``)."""
    return vision_tower.post_layernorm


def pooling_cell_side(projector: torch.nn.Module) -> int:
    """Gemma 3: the side, in patches, of the square the projector averages into one token."""
    return int(projector.kernel_size)


def project_pooled_cells(projector: torch.nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """Gemma 3's projector after its average pooling: ``(B, N, D_vision)`` cell means -> ``(B, N, D_text)``."""
    normed = projector.mm_soft_emb_norm(pooled)
    return torch.matmul(normed, projector.mm_input_projection_weight).type_as(pooled)


DEEPSTACK_ADD = "_deepstack_process"
"""Qwen3-VL's text model method that adds one decoder layer's DeepStack features at the visual positions:
``(hidden_states, visual_pos_masks, visual_embeds)``; FlowCut replaces it on the instance."""


# -- processors ------------------------------------------------------------------------------------

MULTIMODAL_TOKEN_COUNTS = "_get_num_multimodal_tokens"
"""The processor method that counts each image's placeholders (vLLM and serving code call it)."""


def multimodal_token_counter(processor: Any) -> Callable[..., Any] | None:
    """A processor's placeholder counter (None where the processor has none)."""
    return getattr(processor, MULTIMODAL_TOKEN_COUNTS, None)
