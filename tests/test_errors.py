"""Bad input gets a clear error, never a silent wrong answer."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration, SiglipVisionConfig

import flowcut
from conftest import PROMPT, make_image
from flowcut import compat
from flowcut.testing import build_tiny_llava, tiny_llava_config


@pytest.mark.parametrize("keep", [0, -3])
def test_keep_below_one(tiny, keep):
    model, _ = tiny
    with pytest.raises(ValueError, match=f"keep must be at least 1 visual token per image, got {keep}"):
        flowcut.apply(model, keep=keep)


@pytest.mark.parametrize("keep", [True, "64", None.__class__])
def test_keep_not_a_number(tiny, keep):
    model, _ = tiny
    with pytest.raises(TypeError, match=r"keep must be a positive integer number of visual tokens .* or a ratio"):
        flowcut.apply(model, keep=keep)


@pytest.mark.parametrize("keep", [1.5, 64.0, 0.0, 1.0])
def test_fractional_keep_outside_zero_one(tiny, keep):
    model, _ = tiny
    with pytest.raises(ValueError, match=rf"a fractional keep .* must be in \(0, 1\), got {keep}"):
        flowcut.apply(model, keep=keep)


def test_fractional_keep_is_a_share_of_the_patches(tiny):
    model, processor = tiny
    with flowcut.apply(model, processor=processor, keep=0.25) as handle:  # round(0.25 * 144) = 36
        assert handle.tokens_per_image == 36
        inputs = processor(images=make_image(0), text=PROMPT, return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 36


def test_unsupported_model_names_supported_classes():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(
        TypeError, match="does not support LlamaForCausalLM; supported model classes: LlavaForConditionalGeneration"
    ):
        flowcut.apply(model, keep=8)


def test_unknown_method(tiny):
    with pytest.raises(
        ValueError,
        match="unknown method 'fastvv'; available: flowcut, divprune, fastv, hiprune, none, pool, random, visionzip, "
        "vispruner",
    ):
        flowcut.apply(tiny[0], keep=8, method="fastvv")


def test_config_and_keep_together(tiny):
    with pytest.raises(ValueError, match="either config= or keep"):
        flowcut.apply(tiny[0], keep=8, config=flowcut.FlowCutConfig(keep=8))


def test_applied_twice(tiny):
    model, _ = tiny
    flowcut.apply(model, keep=8)
    with pytest.raises(RuntimeError, match="already applied"):
        flowcut.apply(model, keep=16)


def _llava(**overrides):
    model, processor = build_tiny_llava(seed=0)
    config = tiny_llava_config(
        vocab_size=len(processor.tokenizer), image_token_id=model.config.image_token_id, pad_token_id=0
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return LlavaForConditionalGeneration(config).eval(), processor


def test_multi_layer_features_rejected():
    model, _ = _llava(vision_feature_layer=[-2, -5])
    with pytest.raises(ValueError, match=r"single vision feature layer; vision_feature_layer=\[-2, -5\]"):
        flowcut.apply(model, keep=8)


def test_one_feature_layer_in_a_list_is_that_layer(images):
    """``vision_feature_layer=[-2]`` gives the stock model the features of ``-2``; FlowCut prunes it the same."""
    import copy

    listed, processor = _llava(vision_feature_layer=[-2])
    single = copy.deepcopy(listed)
    single.config.vision_feature_layer = -2
    inputs = processor(images=images[0], text=PROMPT, return_tensors="pt")
    logits = []
    for model in (listed, single):
        with flowcut.apply(model, processor=copy.deepcopy(processor), keep=8) as handle, torch.inference_mode():
            pruned = handle.processor(images=images[0], text=PROMPT, return_tensors="pt")
            logits.append(model(**pruned).logits)
            assert handle.last_trace.kept_indices[0].numel() == 8
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    assert inputs["input_ids"].shape[1] > pruned["input_ids"].shape[1]


def test_full_select_strategy_rejected():
    model, _ = _llava(vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full' is not supported"):
        flowcut.apply(model, keep=8)


def test_feature_layer_without_room_to_prune():
    model, _ = _llava(vision_feature_layer=1)  # the output of encoder layer 0
    with pytest.raises(ValueError, match="leaves no encoder layer before the features"):
        flowcut.apply(model, keep=8)


def test_call_time_feature_layer_is_checked(tiny, images):
    model, processor = tiny
    flowcut.apply(model, keep=8)
    pixel_values = processor.image_processor(images[0], return_tensors="pt").pixel_values
    with pytest.raises(ValueError, match="single vision feature layer"):
        model.model.get_image_features(pixel_values, vision_feature_layer=[-2, -3])


def test_vision_tower_without_cls_rejected():
    model, _ = build_tiny_llava(seed=0)
    config = model.config
    config.vision_config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=84, patch_size=7
    )
    siglip_model = LlavaForConditionalGeneration(config)
    with pytest.raises(TypeError, match="needs a CLIPVisionModel vision tower, got SiglipVisionModel"):
        flowcut.apply(siglip_model, keep=8)


def test_stock_placeholders_explained(tiny, images):
    model, processor = tiny
    stock_inputs = processor(images=images[0], text=PROMPT, return_tensors="pt")
    flowcut.apply(model, keep=8)  # processor not passed: placeholders stay at 144
    with pytest.raises(ValueError, match="holds 144 image tokens per image, but this model keeps 8"), torch.no_grad():
        model(**stock_inputs)
    with pytest.raises(ValueError, match="holds 144 image tokens per image"), torch.no_grad():
        model.generate(**stock_inputs, max_new_tokens=2)


def test_processor_shared_by_two_handles(images):
    first, processor = build_tiny_llava(seed=0)
    second, _ = build_tiny_llava(seed=0)
    flowcut.apply(first, processor=processor, keep=8)
    with pytest.raises(ValueError, match="already adapted by another FlowCut handle"):
        flowcut.apply(second, processor=processor, keep=16)
    # The failed apply left the second model untouched.
    assert flowcut.get_handle(second) is None and "get_image_features" not in second.model.__dict__


def test_recording_attention_outside_a_pass():
    from flowcut.runtime.attention import _recording_attention

    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="runs only inside FlowCut's own encoder pass"):
        _recording_attention(None, q, q, q, None)


def test_config_round_trip(tmp_path):
    config = flowcut.FlowCutConfig(keep=32, ema_weight=0.25)
    config.save(tmp_path)
    assert flowcut.FlowCutConfig.load(tmp_path) == config
    with pytest.raises(ValueError, match="unknown FlowCut config keys: bogus"):
        flowcut.FlowCutConfig.from_dict({"keep": 8, "bogus": 1})
    with pytest.raises(ValueError, match="ema_weight must be in"):
        flowcut.FlowCutConfig(ema_weight=1.0)


def test_unsupported_vision_attention_implementation(tiny, images):
    model, processor = tiny
    flowcut.apply(model, keep=8)
    compat.set_attention_implementation(model.model.vision_tower.config, "flex_attention")
    pixel_values = processor.image_processor(images[0], return_tensors="pt").pixel_values
    with pytest.raises(ValueError, match="not 'flex_attention'"):
        model.model.get_image_features(pixel_values)
    # The failed pass left the configured implementation in place.
    assert compat.attention_implementation(model.model.vision_tower.config) == "flex_attention"


@pytest.mark.parametrize("method", ["flowcut", "fastv"])
def test_unsupported_attention_is_refused_at_apply(method):
    """Known at apply: the vision tower's implementation where the encoder stage runs (FastV's runs stock, so
    only its language model is refused), the language model's where a decoder layer prunes."""
    model, processor = build_tiny_llava(seed=0, text_layers=4, attn_implementation="flex_attention")
    where = "the vision tower" if method == "flowcut" else "the language model"
    with pytest.raises(ValueError, match=f"attention in {where}, not 'flex_attention'"):
        flowcut.apply(model, processor=processor, keep=8, method=method)
    assert flowcut.get_handle(model) is None and "get_image_features" not in vars(model.model)


GREEDY = {"max_new_tokens": 3, "do_sample": False}


def skip_unless_stock_chunking_is_exact(model, inputs) -> None:
    """transformers 5.21 and 5.22's own chunked prefill answers differently from one pass (5.23 and 5.24 do not)."""
    stock = model.generate(**inputs, **GREEDY)
    if not torch.equal(stock, model.generate(**inputs, **GREEDY, prefill_chunk_size=8)):
        pytest.skip(f"transformers {compat.TRANSFORMERS_VERSION}'s own chunked prefill differs from one pass")


def test_chunked_prefill_with_encoder_stage_pruning_equals_one_pass(images):
    model, processor = build_tiny_llava(seed=0, vision_layers=3, text_layers=3)
    skip_unless_stock_chunking_is_exact(
        model, processor(images=images[:2], text=[PROMPT] * 2, return_tensors="pt", padding=True)
    )
    with flowcut.apply(model, processor=processor, keep=16):
        inputs = processor(images=images[:2], text=[PROMPT] * 2, return_tensors="pt", padding=True)
        whole = model.generate(**inputs, **GREEDY)
        assert torch.equal(whole, model.generate(**inputs, **GREEDY, prefill_chunk_size=8))


def test_chunked_prefill_refused_where_the_language_model_prunes(images):
    """The language-model stage scores the whole prompt in one pass; generate(prefill_chunk_size=...) splits it."""
    from conftest import picture
    from flowcut.testing import build_tiny_llava_next

    model, processor = build_tiny_llava(seed=0, vision_layers=3, text_layers=3)
    with flowcut.apply(model, processor=processor, keep=16, method="fastv"):
        inputs = processor(images=images[:1], text=[PROMPT], return_tensors="pt")
        with pytest.raises(ValueError, match=r"a prompt split over several passes \(generate\(prefill_chunk_size"):
            model.generate(**inputs, **GREEDY, prefill_chunk_size=8)
    model, processor = build_tiny_llava_next(vision_layers=4, text_layers=3)
    text, image = ["USER: <image>\nwhat ? ASSISTANT:"], [picture(60, 64, 0)]
    skip_unless_stock_chunking_is_exact(model, processor(images=image, text=text, return_tensors="pt"))
    flowcut.apply(model, processor=processor, keep=8)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with pytest.raises(ValueError, match=r"generate\(prefill_chunk_size=...\) also slices them"):
        model.generate(**inputs, **GREEDY, prefill_chunk_size=8)


def test_deep_copy_of_a_pruned_model_is_refused_and_works_after_remove():
    """The installed methods close over the original instance: a copy would silently encode with its weights."""
    import copy

    model, processor = build_tiny_llava(seed=0)
    handle = flowcut.apply(model, processor=processor, keep=16)
    with pytest.raises(TypeError, match=r"cannot be deep-copied .* copy it before flowcut.apply"):
        copy.deepcopy(model)
    handle.remove()
    clone = copy.deepcopy(model)
    with flowcut.apply(clone, processor=processor, keep=16) as clone_handle:
        assert clone_handle.active and not handle.active


@pytest.mark.parametrize("name", ["build_tiny_llava_next", "build_tiny_llava_next_video", "build_tiny_llava_onevision"])
def test_tiny_builders_defaults_take_the_default_method(name):
    from flowcut import testing

    model, processor = getattr(testing, name)()
    with flowcut.apply(model, processor=processor, keep=8) as handle:
        assert handle.prunes_in_language_model
