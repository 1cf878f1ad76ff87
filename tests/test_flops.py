"""Analytic prefill FLOPs equal torch's FLOP counter on eager-attention models, stock and pruned."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import flowcut
from conftest import make_image
from flowcut import compat
from flowcut.testing import (
    build_tiny_gemma3,
    build_tiny_internvl,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_qwen,
)
from flowcut.tools.bench.flops import TextShape, VisionShape, prefill_flops, scoring_flops, vision_layer_flops
from flowcut.tools.bench.run import BenchSetting, _result
from flowcut.tools.prompting import prompt_inputs

PROMPT = "USER: <image>\nwhat colour is the circle ? ASSISTANT:"


def test_layer_flops_by_hand():
    shape = VisionShape(hidden=4, intermediate=8, layers=1, patch_size=2, num_patches=4)
    # 3 tokens: projections 4·3·16, attention 2·9·4, MLP 2·3·4·8 multiply-adds, two FLOPs each.
    assert vision_layer_flops(shape, 3) == 2 * (192 + 72 + 192)
    assert scoring_flops(4, [2, 1]) == 4 * 3 * 4 + 4 * 2 * 4


@pytest.fixture
def eager():
    model, processor = build_tiny_llava(seed=0, vision_layers=8, text_layers=3, initializer_factor=6.0)
    compat.set_attention_implementation(model.config.vision_config, "eager")
    compat.set_attention_implementation(model.config.text_config, "eager")
    config = model.config
    vision = config.vision_config
    text = config.text_config
    shapes = (
        VisionShape(
            vision.hidden_size,
            vision.intermediate_size,
            vision.num_hidden_layers,
            vision.patch_size,
            (vision.image_size // vision.patch_size) ** 2,
        ),
        TextShape(
            text.hidden_size,
            text.intermediate_size,
            text.num_hidden_layers,
            text.num_attention_heads,
            text.num_key_value_heads,
            text.vocab_size,
        ),
    )
    return model, processor, shapes


def _counted(model, inputs) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


def test_stock_prefill_matches_the_flop_counter(eager):
    model, processor, (vision, text) = eager
    inputs = processor(images=make_image(0), text=PROMPT, return_tensors="pt")
    length = inputs.input_ids.shape[1]
    visual = vision.num_patches
    # The stock LLaVA path runs every encoder layer, the one after the feature layer included.
    expected = prefill_flops(vision, text, [visual] * vision.layers, visual, length - visual, head_tokens=length)
    assert _counted(model, inputs) == expected.total


def test_flowcut_prefill_matches_the_flop_counter(eager):
    model, processor, (vision, text) = eager
    handle = flowcut.apply(model, processor=processor, keep=16)
    inputs = processor(images=make_image(0), text=PROMPT, return_tensors="pt")
    counted = _counted(model, inputs)
    record = handle.last_trace.images[0]
    assert len(set(record.tokens_per_layer)) > 2  # progressive: several live counts
    length = inputs.input_ids.shape[1]
    expected = prefill_flops(vision, text, record.tokens_per_layer, 16, length - 16, head_tokens=length)
    scored = [
        tokens
        for tokens, ratio in zip(record.tokens_per_layer, record.entropy_ratios, strict=True)
        if ratio is not None
    ]
    # FlowCut's CLS-row scores are broadcast products, which the counter (matrix products only) leaves
    # out, as the paper's convention does; their cost is a small fraction of the pass.
    assert counted == expected.total
    assert scoring_flops(vision.hidden, scored) < expected.vision / 100
    stock_layers = [vision.num_patches] * vision.layers
    stock = prefill_flops(vision, text, stock_layers, vision.num_patches, length - 16, head_tokens=length)
    assert expected.total < stock.total / 2


def assert_prefill_flops_match(model, processor, image, methods: tuple[str, ...], keep: int) -> None:
    """Stock: the analytic count is the counter's, exactly. Pruned: the counter sees the analytic count plus the
    scoring products (broadcast or small matrix products, < 1 %)."""
    for setting in (BenchSetting(None), *(BenchSetting(method, keep) for method in methods)):
        handle = None if setting.method is None else flowcut.apply(model, processor=processor, config=setting.config())
        inputs = prompt_inputs(processor, image, "what colour is it ?", torch.device("cpu"), torch.float32)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            output = model(**inputs, use_cache=True, logits_to_keep=1)
        expected = _result(model, setting, handle, inputs, output, 2).flops.total
        counted = counter.get_total_flops()
        if handle is None:
            assert counted == expected
        else:
            handle.remove()
            assert 0 <= counted - expected < expected / 100, setting.label


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl", "llava-next"])
def test_two_stage_family_prefill_flops_match_the_flop_counter(family):
    """Stock: exact. Pruned: the analytic count plus the language stage's scoring products (< 1 %)."""
    if family.startswith("qwen"):
        version = family.removeprefix("qwen").removesuffix("-vl")
        model, processor = build_tiny_qwen(version, attn_implementation="eager", max_pixels=64 * 64)
        image = make_image(0).resize((64, 64))
    else:  # 168 px: a 2x2 grid of 84-px crops plus the base view
        model, processor = build_tiny_llava_next(attn_implementation="eager", text_layers=3)
        image = make_image(0).resize((168, 168))
    assert_prefill_flops_match(model, processor, image, ("flowcut", "fastv", "pool", "random"), 8)


def test_gemma3_prefill_flops_match_the_flop_counter():
    """Gemma 3: SigLIP over every patch of the kept cells, the pooled tokens' one-matrix projection, a decoder
    whose heads are not ``hidden / heads`` wide. Stock: exact; pruned: plus the encoder's scoring (< 1 %)."""
    model, processor = build_tiny_gemma3(attn_implementation="eager", text_head_dim=24)  # 4 heads of 24, 64 wide
    assert_prefill_flops_match(model, processor, [make_image(0)], ("flowcut", "visionzip", "pool"), 6)


def test_internvl_prefill_flops_match_the_flop_counter():
    """InternVL: InternViT (CLS) over every tile and the thumbnail, the projector over the 2×2 shuffle groups handed
    on, FlowCut's two stages per tile."""
    model, processor = build_tiny_internvl(attn_implementation="eager", text_layers=3)
    image = make_image(0).resize((40, 100))  # 3 tiles and a thumbnail
    assert_prefill_flops_match(model, processor, [image], ("flowcut", "fastv", "pool", "random"), 6)
