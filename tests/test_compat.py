"""Canaries for the transformers seams in ``flowcut.compat``: one test per seam, on tiny models.

Each test exercises exactly one seam and, when transformers has moved it, fails with one line
that names the seam and the installed transformers version (``seam(...)``), so a new release's
breakage is diagnosed before any pruning test is read.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, StaticCache

from conftest import PROMPT, make_image, picture
from flowcut import compat
from flowcut.runtime import InstancePatch
from flowcut.testing import (
    build_tiny_gemma3,
    build_tiny_internvl,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_qwen,
)

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def seam(name: str) -> Iterator[None]:
    """Turn any failure inside the block into one line naming the seam and the transformers version."""
    try:
        yield
    except Exception as error:  # assertion errors included: the point is the one-line diagnosis
        pytest.fail(
            f"transformers seam {name!r} broke on transformers {compat.TRANSFORMERS_VERSION} "
            f"(verified: {compat.VERIFIED_TRANSFORMERS}): {type(error).__name__}: {error}",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def llava():
    model, processor = build_tiny_llava(seed=0, vision_layers=3, text_layers=3)
    processor.tokenizer.padding_side = "left"
    return model, processor


def llava_inputs(processor, prompts: list[str]) -> dict:
    return processor(
        images=[make_image(i) for i in range(len(prompts))], text=prompts, return_tensors="pt", padding=True
    )


PADDED_PROMPTS = [PROMPT, "USER: <image>\nwhat ? ASSISTANT:"]


# -- the declared range ----------------------------------------------------------------------------


def test_pyproject_allows_exactly_the_verified_range():
    requirement = re.search(r'^\s*"transformers([^"]*)",', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert requirement is not None and requirement.group(1) == compat.VERIFIED_TRANSFORMERS


def test_ci_tests_the_oldest_verified_release():
    oldest = re.search(r"^OLDEST_TRANSFORMERS := (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert oldest is not None and oldest.group(1) == "{}.{}.0".format(*compat.OLDEST_VERIFIED)


def test_the_tested_transformers_is_a_verified_one():
    # CI runs the suite on the two ends of the range; a run on anything else is not a verification.
    assert compat.is_verified(), (
        f"transformers {compat.TRANSFORMERS_VERSION} is outside the verified {compat.VERIFIED_TRANSFORMERS}"
    )


def test_versions_outside_the_range_warn_once_naming_the_range():
    assert [compat.is_verified(v) for v in ("5.20.2", "5.21.0", "5.24.1", "5.25.0.dev0", "5.25.0", "6.0.0")] == [
        False,
        True,
        True,
        False,
        False,
        False,
    ]
    assert compat.is_verified("5.24.0rc1")
    with pytest.warns(compat.UnverifiedTransformersWarning, match=r">=5\.21,<5\.25; transformers 9\.1\.0 is installed"):
        assert compat.check_transformers_version("9.1.0") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_transformers_version("9.1.0") is False  # once per process and version
        assert compat.check_transformers_version(compat.TRANSFORMERS_VERSION) is True


def test_apply_warns_on_an_unverified_transformers(llava, monkeypatch):
    import flowcut

    model, _ = llava
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", "5.99.0")
    with pytest.warns(compat.UnverifiedTransformersWarning, match="5.99.0"):
        flowcut.apply(model, keep=16).remove()


# -- KV cache --------------------------------------------------------------------------------------


def test_decoder_layers_receive_the_cache_the_model_returns(llava):
    model, processor = llava
    inputs = llava_inputs(processor, PADDED_PROMPTS)
    layers = model.model.language_model.layers
    seen = []
    hook = layers[1].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(compat.cache_argument(kwargs)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            output = model(**inputs, use_cache=True)
    finally:
        hook.remove()
    with seam("cache argument of decoder layers / cache field of outputs"):
        cache = compat.output_cache(output)
        assert cache is not None and seen == [cache]
        length = inputs["input_ids"].shape[1]
        assert [compat.cache_length(cache, layer) for layer in range(len(layers))] == [length] * len(layers)
        assert [compat.layer_index(layer.self_attn) for layer in layers] == list(range(len(layers)))


def test_generate_passes_the_cache_to_the_model(llava):
    model, processor = llava
    inputs = llava_inputs(processor, PADDED_PROMPTS)
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(compat.cache_length(compat.cache_argument(kwargs))),
        with_kwargs=True,
    )
    try:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    prompt = inputs["input_ids"].shape[1]
    with seam("cache argument of the model in generate"):
        assert lengths == [0, prompt, prompt + 1]


def test_static_caches_are_recognised(llava):
    model, _ = llava
    with seam("static cache flag (is_compileable)"):
        assert compat.is_static_cache(StaticCache(config=model.config.text_config, max_cache_len=8))
        assert not compat.is_static_cache(DynamicCache(config=model.config.text_config))
        assert not compat.is_static_cache(None)


# -- attention implementations ---------------------------------------------------------------------


def test_a_registered_attention_function_is_what_the_layers_call(llava):
    model, processor = llava
    calls = []

    def counting_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(type(module).__name__)
        return compat.attention_function("sdpa", compat.eager_attention(module))(
            module, query, key, value, attention_mask, **kwargs
        )

    compat.register_attention("flowcut_canary", counting_attention)
    config = model.model.vision_tower.config
    pixel_values = processor.image_processor([make_image(0)], return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = model.model.vision_tower(pixel_values).last_hidden_state
        previous = compat.attention_implementation(config)
        compat.set_attention_implementation(config, "flowcut_canary")
        try:
            routed = model.model.vision_tower(pixel_values).last_hidden_state
        finally:
            compat.set_attention_implementation(config, previous)
    with seam("attention implementation selected on a config / AttentionInterface registry"):
        assert previous == "sdpa"
        assert calls == ["CLIPAttention"] * len(model.model.vision_tower.encoder.layers)
        torch.testing.assert_close(routed, expected)


def test_eager_attention_of_a_modelling_file(llava):
    model, _ = llava
    attention = model.model.language_model.layers[0].self_attn
    with seam("eager_attention_forward of a modelling file"):
        assert compat.eager_attention(attention).__module__ == type(attention).__module__
        assert compat.clip_eager_attention is compat.eager_attention(
            model.model.vision_tower.encoder.layers[0].self_attn
        )


# -- decoder and encoder layers --------------------------------------------------------------------


def test_decoder_layers_receive_states_masks_and_positions(llava):
    """Pruning after a layer reads the hidden states, the mask and the rotary tables a later layer is given."""
    model, processor = llava
    inputs = llava_inputs(processor, PADDED_PROMPTS)
    batch, length = inputs["input_ids"].shape
    received = {}

    def before(module, args, kwargs):
        received["states"] = compat.layer_hidden_states(args, kwargs).shape
        received["mask"] = kwargs.get("attention_mask")
        received["positions"] = kwargs.get("position_embeddings")

    hook = model.model.language_model.layers[1].register_forward_pre_hook(before, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    with seam("decoder-layer arguments (hidden states, attention_mask, position_embeddings)"):
        assert received["states"] == (batch, length, model.config.text_config.hidden_size)
        mask = received["mask"]
        assert isinstance(mask, torch.Tensor) and mask.dim() == 4  # SDPA with padding: (B, 1, Q, K)
        assert mask.shape[0] == batch and mask.shape[-2:] == (length, length)
        cos, sin = received["positions"]
        assert cos.shape[-2] == sin.shape[-2] == length


def test_a_decoder_layer_output_can_be_cut(llava):
    """A forward hook that returns shorter hidden states shortens what every later layer sees."""
    model, processor = llava
    inputs = llava_inputs(processor, [PROMPT])
    layers = model.model.language_model.layers
    later = []
    hooks = [
        layers[0].register_forward_hook(
            lambda module, args, output: compat.with_layer_output_states(
                output, compat.layer_output_states(output)[:, :5]
            )
        ),
        layers[1].register_forward_pre_hook(
            lambda module, args, kwargs: later.append(compat.layer_hidden_states(args, kwargs).shape[1]),
            with_kwargs=True,
        ),
    ]
    try:
        with torch.no_grad():
            with pytest.raises(RuntimeError):  # the uncut mask no longer fits, which the pruner cuts too
                model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    with seam("decoder-layer output form (tensor or tuple with the hidden states first)"):
        assert later == [5]


def test_vision_encoder_layers_run_one_by_one(llava):
    model, processor = llava
    tower = model.model.vision_tower
    pixel_values = processor.image_processor([make_image(0)], return_tensors="pt").pixel_values
    with torch.no_grad():
        stock = tower(pixel_values, output_hidden_states=True).hidden_states
        states = tower.pre_layrnorm(tower.embeddings(pixel_values))
        outputs = []
        for layer in tower.encoder.layers:
            states = compat.run_vision_layer(layer, states, None)
            outputs.append(states)
    with seam("CLIP vision tower classes and encoder-layer call"):
        assert isinstance(tower, compat.CLIPVisionModel)
        assert isinstance(tower.embeddings, compat.CLIPVisionEmbeddings)
        assert all(isinstance(layer, compat.CLIPEncoderLayer) for layer in tower.encoder.layers)
        for ours, theirs in zip(outputs, stock[1:], strict=True):
            torch.testing.assert_close(ours, theirs)


# -- generate and the encoder call -----------------------------------------------------------------


def test_generate_encodes_through_the_instance_and_passes_the_encoding(llava):
    model, processor = llava
    inputs = llava_inputs(processor, PADDED_PROMPTS)
    stock = model.model.get_image_features
    encodings, passed = [], []

    # generate reads the override's signature to pick its arguments: the pixels must be a named parameter.
    def get_image_features(pixel_values, **kwargs):
        encodings.append(stock(pixel_values=pixel_values, **kwargs))
        return encodings[-1]

    model.model.get_image_features = get_image_features
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: passed.append((kwargs.get("mm_encoder_outputs") or {}).get("image")),
        with_kwargs=True,
    )
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
        del model.model.get_image_features
    with seam("generate calls the instance's get_image_features and passes mm_encoder_outputs"):
        assert len(encodings) == 1
        assert passed[0] is encodings[0]


def test_outputs_carry_the_projected_image_features(llava):
    model, processor = llava
    inputs = llava_inputs(processor, PADDED_PROMPTS)
    with torch.no_grad():
        output = model(**inputs)
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    with seam("get_image_features output class (BaseModelOutputWithPooling)"):
        assert isinstance(model.model.get_image_features(pixel_values=inputs["pixel_values"]), compat.EncoderOutput)
    with seam("image features field of model outputs (image_outputs / image_hidden_states)"):
        expected = torch.cat([feature.reshape(-1, feature.shape[-1]) for feature in features])
        torch.testing.assert_close(compat.output_image_features(output), expected)


# -- helpers of individual model files -------------------------------------------------------------


def test_llava_next_crop_helpers():
    model, processor = build_tiny_llava_next(vision_layers=2, text_layers=2)
    image = picture(100, 90, 1)
    inputs = processor(images=[image], text=["USER: <image>\nwhat ? ASSISTANT:"], return_tensors="pt")
    pinpoints, crop = model.config.image_grid_pinpoints, model.config.vision_config.image_size
    with seam("LLaVA-NeXT anyres helpers (image_size_to_num_patches, get_anyres_image_grid_shape, unpad_image)"):
        size = inputs["image_sizes"][0].tolist()
        rows, columns = compat.anyres_grid_shape(size, pinpoints, crop)
        assert compat.anyres_crop_count(size, pinpoints, crop) == inputs["pixel_values"].shape[1] == rows * columns + 1
        grid = torch.zeros(3, rows * 4, columns * 4)
        assert compat.unpad_image(grid, torch.tensor(size)).shape[0] == 3


def test_qwen_vision_positions():
    model, _ = build_tiny_qwen("2", vision_layers=1, text_layers=2)
    grid = torch.tensor([[1, 4, 6]])
    with seam("Qwen-VL vision position ids (get_vision_position_ids)"):
        positions = compat.vision_position_ids(grid, model.config.vision_config.spatial_merge_size)
        assert positions.shape == (24, 2)
        # Merge groups of 2x2 patches come first: (0,0), (0,1), (1,0), (1,1), then the next group.
        assert positions[:5].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2]]


def test_qwen3_vl_position_grid_and_deepstack_seams():
    model, _ = build_tiny_qwen("3", vision_layers=4, text_layers=2)
    visual, language = model.model.visual, model.model.language_model
    grid = torch.tensor([[1, 4, 6]])
    with seam("Qwen3-VL learned position grid (pos_embed, get_vision_interpolation_indices_and_weights)"):
        table = compat.interpolated_position_embeddings(visual, grid)
        assert table.shape == (24, visual.config.hidden_size)
        # A 4x6 grid resampled from the 8x8 table: its corner patch takes the table's corner exactly.
        torch.testing.assert_close(table[0], visual.pos_embed.weight[0])
    with seam("Qwen3-VL DeepStack (deepstack_visual_indexes, deepstack_merger_list, _deepstack_process)"):
        assert compat.deepstack_layers(visual) == [1, 2]
        assert compat.deepstack_merger(visual, 2) is visual.deepstack_merger_list[1]
        hidden = torch.zeros(1, 3, language.config.hidden_size)
        mask = torch.tensor([[False, True, True]])
        rows = torch.ones(2, language.config.hidden_size)
        added = getattr(language, compat.DEEPSTACK_ADD)(hidden, mask, rows)
        assert added[0, 0].abs().sum() == 0 and torch.equal(added[0, 1:], rows)
        pixels = torch.zeros(24, 3 * 2 * 4 * 4)
        output = model.model.get_image_features(pixels, grid)
        assert isinstance(output, compat.DeepstackEncoderOutput) and len(output.deepstack_features) == 2


def test_gemma3_pooling_projector_and_siglip_final_norm_seams():
    model, processor = build_tiny_gemma3(vision_layers=2, text_layers=2)
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    pixels = torch.rand(1, 3, 64, 64)
    with seam("SigLIP final norm (SiglipVisionModel.post_layernorm)"):
        with torch.no_grad():
            output = tower(pixel_values=pixels, output_hidden_states=True)
        torch.testing.assert_close(
            compat.siglip_post_layernorm(tower)(output.hidden_states[-1]), output.last_hidden_state
        )
    with seam("Gemma 3 pooling projector (kernel_size, mm_soft_emb_norm, mm_input_projection_weight)"):
        assert compat.pooling_cell_side(projector) == 4
        states = output.last_hidden_state
        # The mean of each 4×4 square of the 16×16 patch grid, row-major over the squares.
        means = states.view(1, 4, 4, 4, 4, -1).mean(dim=(2, 4)).reshape(1, 16, -1)
        with torch.no_grad():
            torch.testing.assert_close(compat.project_pooled_cells(projector, means), projector(states))
    with seam("Gemma 3 processor (begin-of-image marker expanded to the tokenizer's image_token)"):
        assert processor.image_token == "<start_of_image>"
        assert processor.tokenizer.image_token_id == model.config.image_token_id
        assert processor.replace_image_token({"num_crops": [0]}, 0).count(processor.tokenizer.image_token) == 16


def test_internvl_tower_shuffle_and_final_norm_seams():
    model, processor = build_tiny_internvl(vision_layers=2, text_layers=2)
    tower = model.model.vision_tower
    pixels = torch.rand(2, 3, 32, 32)
    with seam("InternViT layers (InternVLVisionLayer(hidden_states), its .attention, InternVLVisionEmbeddings)"):
        layers = [m for m in tower.modules() if isinstance(m, compat.InternVLVisionLayer)]
        embeddings = next(m for m in tower.modules() if isinstance(m, compat.InternVLVisionEmbeddings))
        with torch.no_grad():
            output = tower(pixel_values=pixels, output_hidden_states=True)
            states = embeddings(pixels)
            for layer in layers:
                assert isinstance(layer.attention, torch.nn.Module)
                states = compat.run_maskless_vision_layer(layer, states)
        torch.testing.assert_close(states, output.hidden_states[-1])
    with seam("InternVL final norm (InternVLVisionModel.layernorm)"):
        torch.testing.assert_close(compat.internvl_final_norm(tower)(states), output.last_hidden_state)
    with seam("InternVL pixel shuffle order (2×2 groups, patches row-major within a group)"):
        grid = torch.arange(64.0).reshape(1, 8, 8, 1)  # patch (r, c) holds 8r + c
        shuffled = model.model.pixel_shuffle(grid, scale_factor=model.config.downsample_ratio)
        assert shuffled.shape == (1, 4, 4, 4) and shuffled[0, 1, 2].tolist() == [20.0, 21.0, 28.0, 29.0]
    with seam("InternVL processor (<img> + image_seq_length placeholders per tile + </img>; counter adds 2)"):
        text = processor.replace_image_token({"num_patches": [3]}, 0)
        assert text == "<img>" + "<IMG_CONTEXT>" * 48 + "</img>"
        assert processor.image_token_id == model.config.image_token_id


# -- processors ------------------------------------------------------------------------------------


def test_processor_placeholder_seams(llava):
    _, processor = llava
    counter = compat.multimodal_token_counter(processor)
    patch = InstancePatch()
    with seam("processor placeholder counting (replace_image_token, _get_num_multimodal_tokens)"):
        assert counter is not None
        assert counter(image_sizes=[(84, 84)]).num_image_tokens == [144]
        patch.override(processor, "replace_image_token", lambda stock: lambda *a, **k: processor.image_token * 7)
        patch.override(processor, compat.MULTIMODAL_TOKEN_COUNTS, lambda stock: lambda **kwargs: "pruned")
        try:
            inputs = processor(images=[make_image(0)], text=[PROMPT], return_tensors="pt")
            assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 7
            assert compat.multimodal_token_counter(processor)() == "pruned"
        finally:
            patch.restore()
        assert compat.multimodal_token_counter(processor)(image_sizes=[(84, 84)]).num_image_tokens == [144]
