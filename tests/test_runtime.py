"""Installation on one instance is undone from structure, on every family: what was there comes back."""

from __future__ import annotations

import pytest
import torch

import flowcut
from conftest import picture
from flowcut import testing
from flowcut.runtime import InstancePatch

BUILDERS = {
    "llava": lambda: testing.build_tiny_llava(vision_layers=3, text_layers=3),
    "llava-next": lambda: testing.build_tiny_llava_next(vision_layers=3, text_layers=3),
    "llava-next-video": lambda: testing.build_tiny_llava_next_video(vision_layers=3, text_layers=3),
    "llava-onevision": lambda: testing.build_tiny_llava_onevision(vision_layers=3, text_layers=3),
    "qwen2-vl": lambda: testing.build_tiny_qwen("2", vision_layers=3, text_layers=3),
    "qwen3-vl": lambda: testing.build_tiny_qwen("3", vision_layers=4, text_layers=3),
    "video-llava": lambda: testing.build_tiny_video_llava(vision_layers=3, text_layers=3),
    "gemma3": lambda: testing.build_tiny_gemma3(vision_layers=3, text_layers=3),
    "internvl": lambda: testing.build_tiny_internvl(vision_layers=3, text_layers=3),
}
ENTRY_POINTS = ("get_image_features", "get_video_features", "get_rope_index")


def hook_counts(model: torch.nn.Module) -> list[int]:
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]


def test_instance_patch_restores_an_absent_attribute_and_a_previous_override():
    class Owner:
        def greet(self) -> str:
            return "class"

    owner, other = Owner(), Owner()
    other.greet = lambda: "own"
    patch = InstancePatch()
    patch.override(owner, "greet", lambda current: lambda: f"wrapped {current()}")
    patch.override(other, "greet", lambda current: lambda: f"wrapped {current()}")
    assert (owner.greet(), other.greet()) == ("wrapped class", "wrapped own")
    patch.restore()
    patch.restore()  # idempotent
    assert "greet" not in owner.__dict__ and other.greet() == "own"


@pytest.mark.parametrize(
    ("family", "method"),
    # Gemma 3 refuses FastV (it prunes in the encoder alone): its DecoderPruner-free install is the flowcut row.
    [
        (family, method)
        for method in ("flowcut", "fastv")
        for family in BUILDERS
        if (family, method) != ("gemma3", "fastv")
    ],
)
def test_remove_brings_back_the_instances_own_overrides_and_hooks(family, method):
    model, processor = BUILDERS[family]()
    base = model.model
    own = {}
    for name in ENTRY_POINTS:
        if hasattr(base, name):  # a user's (or another library's) instance-level override, set before FlowCut
            stock = getattr(base, name)
            own[name] = lambda *args, _stock=stock, **kwargs: _stock(*args, **kwargs)
            setattr(base, name, own[name])
    before_dict, before_hooks = dict(base.__dict__), hook_counts(model)
    language_before = dict(base.language_model.__dict__)
    handle = flowcut.apply(model, processor=processor, keep=4, method=method)
    assert any(base.__dict__[name] is not own[name] for name in own)  # FlowCut wrapped them
    handle.remove()
    handle.remove()
    assert {name: base.__dict__[name] for name in own} == own
    assert base.__dict__.keys() == before_dict.keys()
    assert base.language_model.__dict__.keys() == language_before.keys()  # Qwen3-VL's DeepStack entry too
    assert hook_counts(model) == before_hooks
    # Applying again after removal starts from the same state and undoes to it again.
    flowcut.apply(model, processor=processor, keep=4, method=method).remove()
    assert {name: base.__dict__[name] for name in own} == own and hook_counts(model) == before_hooks


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_an_image_under_its_budget_takes_the_instances_own_path(family):
    """Where nothing is pruned, FlowCut calls what the instance had (its override), not the class's method."""
    model, processor = BUILDERS[family]()
    base = model.model
    stock, calls = base.get_image_features, []

    def counting(*args, **kwargs):
        calls.append(1)
        return stock(*args, **kwargs)

    base.get_image_features = counting
    inputs = processor.image_processor(images=[picture(48, 64, 0)], return_tensors="pt")
    with flowcut.apply(model, processor=processor, keep=10_000):
        if family == "llava":
            base.get_image_features(inputs["pixel_values"])
        else:
            base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert calls == [1]
    assert base.get_image_features is counting


def test_remove_brings_back_the_processors_own_override():
    model, processor = BUILDERS["llava"]()
    stock = processor.replace_image_token
    own = lambda *args, **kwargs: stock(*args, **kwargs)  # noqa: E731 - a user's instance-level override
    processor.replace_image_token = own
    handle = flowcut.apply(model, processor=processor, keep=4)
    inputs = processor(images=[picture(84, 84, 0)], text=["USER: <image>\nwhat ? ASSISTANT:"], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4  # FlowCut's count, through own
    handle.remove()
    assert processor.__dict__["replace_image_token"] is own
    assert "_get_num_multimodal_tokens" not in processor.__dict__


@pytest.mark.parametrize("builder", ["llava-next", "qwen2-vl"])
def test_encodings_describe_their_media_and_foreign_ones_are_refused(builder):
    from flowcut import compat
    from flowcut.runtime.encoding import MediaEncoding, encoded_media

    model, processor = BUILDERS[builder]()
    image = picture(48, 64, 0)
    if builder == "qwen2-vl":
        content = [{"type": "image"}, {"type": "text", "text": "what ?"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        feature_args = ("pixel_values", "image_grid_thw")
    else:
        text, feature_args = "USER: <image>\nwhat ? ASSISTANT:", ("pixel_values", "image_sizes")
    stock_inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        stock = model.model.get_image_features(*(stock_inputs[name] for name in feature_args))
    assert type(stock) is compat.EncoderOutput
    with pytest.raises(ValueError, match="these image encodings were not made by this model's get_image_features"):
        encoded_media(stock, "image")
    with flowcut.apply(model, processor=processor, keep=8), torch.no_grad():
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        encoding = model.model.get_image_features(*(inputs[name] for name in feature_args))
        assert isinstance(encoding, MediaEncoding) and isinstance(encoding, compat.EncoderOutput)
        items = encoded_media(encoding, "image")[0]
        placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert [item.placeholders for item in items] == [placeholders]
        assert placeholders == (12 if builder == "llava-next" else 16)  # 3 crops of T/2; 2T merge groups
        # generate hands the encoding back in place of the pixels; the prefill reads its items from it
        given = {key: value for key, value in inputs.items() if key != "pixel_values"}
        from_encoding = model(**given, mm_encoder_outputs={"image": encoding}).logits
        assert torch.equal(from_encoding, model(**inputs).logits)


FEATURE_ARGUMENTS = {
    "llava": ("pixel_values",),
    "llava-next": ("pixel_values", "image_sizes"),
    "qwen2-vl": ("pixel_values", "image_grid_thw"),
    "gemma3": ("pixel_values",),
    "internvl": ("pixel_values",),
}


def _same(first, second) -> bool:
    if isinstance(first, torch.Tensor):
        return torch.equal(first, second)
    if isinstance(first, (list, tuple)):
        return len(first) == len(second) and all(_same(a, b) for a, b in zip(first, second, strict=True))
    return first == second


@pytest.mark.parametrize("family", FEATURE_ARGUMENTS)
def test_a_tuple_asked_for_is_the_stock_methods_tuple(family):
    """``return_dict=False``: where nothing is pruned, the stock tuple itself; where the tower prunes, the tuple
    of the same output object (no FlowCut description fields)."""
    model, processor = BUILDERS[family]()
    pixels = processor.image_processor(images=[picture(48, 64, 0)], return_tensors="pt")
    arguments = [pixels[name] for name in FEATURE_ARGUMENTS[family]]
    extra = {"vision_feature_layer": -1, "vision_feature_select_strategy": "default"} if family == "internvl" else {}
    with torch.no_grad():
        stock = model.model.get_image_features(*arguments, return_dict=False, **extra)
        with flowcut.apply(model, processor=processor, keep=10_000):
            assert _same(model.model.get_image_features(*arguments, return_dict=False), stock)
        with flowcut.apply(model, processor=processor, keep=4):
            as_tuple = model.model.get_image_features(*arguments, return_dict=False)
            as_output = model.model.get_image_features(*arguments)
    own = tuple(value for name, value in as_output.items() if name not in ("media", "scoring_seconds", "rows"))
    assert isinstance(as_tuple, tuple) and _same(as_tuple, own)
    assert _same(as_output[0], as_tuple[0])  # indexing an encoding sees the stock layout first
