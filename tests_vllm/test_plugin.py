"""The plugin's registration, its settings and the tensor-parallel score reduction, without starting an engine."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPVisionConfig, LlavaConfig, SiglipVisionConfig

from flowcut.core.encoder_stage import AttentionRecord
from flowcut.core.scoring import cls_criteria, cls_head_sums
from flowcut.integrations.vllm import FLOWCUT_LLAVA_ARCHITECTURE, register
from flowcut.integrations.vllm.encoder import VllmClipEncoderAdapter
from flowcut.integrations.vllm.llava import flowcut_keep, flowcut_stage_settings


def llava_config(**overrides: object) -> LlavaConfig:
    """A LLaVA-1.5-shaped config (CLIP 336 px, 14-px patches: 576 patches, 24 layers)."""
    vision = CLIPVisionConfig(image_size=336, patch_size=14, num_hidden_layers=24)
    config = LlavaConfig(vision_config=vision, vision_feature_layer=-2, vision_feature_select_strategy="default")
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def test_entry_point_registers_the_architecture() -> None:
    from vllm import ModelRegistry

    plugins = {plugin.name: plugin.value for plugin in entry_points(group="vllm.general_plugins")}
    assert plugins.get("flowcut") == "flowcut.integrations.vllm:register"
    register()
    assert FLOWCUT_LLAVA_ARCHITECTURE in ModelRegistry.get_supported_archs()


def test_import_flowcut_does_not_import_vllm() -> None:
    code = "import sys, flowcut, flowcut.integrations.vllm; assert 'vllm' not in sys.modules, 'vllm was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_keep_is_read_from_the_config_overrides() -> None:
    assert flowcut_keep(llava_config(flowcut_keep=64)) == 64
    assert flowcut_keep(llava_config(flowcut_keep=0.25)) == 144  # a ratio of the 576 patches
    settings = flowcut_stage_settings(llava_config(flowcut_keep=64))
    assert (settings.keep, settings.feature_layer, settings.last_prune_layer) == (64, 22, 21)  # SPEC §2: F = 21


def test_missing_keep_says_how_to_set_it() -> None:
    with pytest.raises(ValueError, match=r"--hf-overrides .*\"flowcut_keep\": 64"):
        flowcut_keep(llava_config())


@pytest.mark.parametrize(
    ("keep", "error", "message"),
    [
        (576, ValueError, r"flowcut_keep=576 does not prune: this model has 576 patches per image"),
        (1000, ValueError, r"flowcut_keep=1000 does not prune"),
        (0.9999, ValueError, r"flowcut_keep=0.9999 does not prune"),  # rounds to all 576 patches
        (0, ValueError, r"at least 1 visual token"),
        (1.5, ValueError, r"must be in \(0, 1\)"),
        ("64", TypeError, r"keep must be a positive integer"),
    ],
)
def test_bad_keep_is_refused(keep: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        flowcut_keep(llava_config(flowcut_keep=keep))


def test_unsupported_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="CLIP vision tower"):
        flowcut_keep(LlavaConfig(vision_config=SiglipVisionConfig(), flowcut_keep=64))
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full' is not supported"):
        flowcut_stage_settings(llava_config(flowcut_keep=64, vision_feature_select_strategy="full"))
    with pytest.raises(ValueError, match="single vision feature layer"):
        flowcut_stage_settings(llava_config(flowcut_keep=64, vision_feature_layer=[-2, -5]))


def fake_vision_model(heads: int, local_heads: int, head_dim: int) -> SimpleNamespace:
    """The attributes of vLLM's ``CLIPVisionTransformer`` that the adapter reads."""
    attention = SimpleNamespace(
        num_heads=heads, num_heads_per_partition=local_heads, head_dim=head_dim, scale=head_dim**-0.5
    )
    layer = SimpleNamespace(self_attn=attention)
    return SimpleNamespace(embeddings=None, pre_layrnorm=None, encoder=SimpleNamespace(layers=[layer]))


def test_split_heads_reduce_to_the_full_head_criteria() -> None:
    """Two ranks holding two heads each, summed by a stand-in all-reduce, score as four heads on one rank."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 10, 8, generator=generator) for _ in range(3))
    alive = torch.ones(2, 10, dtype=torch.bool)
    alive[1, 7:] = False  # the second image has fewer live tokens (padding slots)
    scaling = 8**-0.5
    full = cls_criteria(query, key, value, scaling, alive)

    other_rank = cls_head_sums(query[:, 2:], key[:, 2:], value[:, 2:], scaling, alive)
    pending = [other_rank.relation, other_rank.semantic, other_rank.value]

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
        return tensor + pending.pop(0)

    rank0 = VllmClipEncoderAdapter(fake_vision_model(4, 2, 8), reduce_heads=all_reduce)
    reduced = rank0.criteria(AttentionRecord(query[:, :2], key[:, :2], value[:, :2], scaling), alive)
    assert not pending
    for name in ("relation", "semantic", "density"):
        torch.testing.assert_close(getattr(reduced, name), getattr(full, name), rtol=1e-6, atol=1e-7)

    # Without the reduction a rank would score by its own heads only, and ranks would disagree.
    local = cls_criteria(query[:, :2], key[:, :2], value[:, :2], scaling, alive)
    assert not torch.allclose(local.relation, full.relation)


def test_split_heads_need_a_reduction() -> None:
    with pytest.raises(ValueError, match="holds 2 of 4 heads on this rank"):
        VllmClipEncoderAdapter(fake_vision_model(4, 2, 8))
    with pytest.raises(ValueError, match="holds 4 of 4 heads"):
        VllmClipEncoderAdapter(fake_vision_model(4, 4, 8), reduce_heads=lambda tensor: tensor)
