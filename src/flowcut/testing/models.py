"""Tiny, randomly initialised LLaVA, Qwen-VL, Gemma 3 and InternVL models built offline (tests, demos, smoke checks).

Everything is built locally: a word-level tokenizer from the ``tokenizers`` library, PIL-based
image processors, and the models from configs. The weights are random: such a model exercises the
mechanics of pruning, it does not answer questions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BatchFeature,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaProcessor,
)

from flowcut import compat
from flowcut.compat import VideoMetadata, make_batched_videos

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = (
    "user assistant what is the colour color shape of a an in image picture photo this that there are how many "
    "red green blue yellow purple orange white black grey circle square triangle star left right top bottom "
    "above below next to yes no one two three four five six seven eight nine zero small large big describe "
    "object objects and or it which where see do does you can"
).split()
PUNCTUATION = list(".,?!:;'\"-()")
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

VIDEO_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if item['type'] == 'image' %}<image>\n",
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n",
)


QWEN_SPECIAL_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(
    extra_words: list[str] | None = None, special_tokens: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with LLaVA's special tokens (and ``special_tokens``), built without any download."""
    special = list(special_tokens or [])
    vocabulary = list(
        dict.fromkeys(SPECIAL_TOKENS + special + ["USER", "ASSISTANT"] + PUNCTUATION + WORDS + (extra_words or []))
    )
    model = models.WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=["<image>", *special],
    )
    return fast


def build_processor(
    image_size: int, patch_size: int, tokenizer: PreTrainedTokenizerFast | None = None
) -> LlavaProcessor:
    """A LLaVA processor (PIL image processor + local tokenizer) for ``image_size`` square images."""
    tokenizer = tokenizer or build_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_llava_config(
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    image_size: int = 84,
    patch_size: int = 7,
    vision_layers: int = 6,
    vision_hidden: int = 32,
    vision_heads: int = 4,
    text_layers: int = 2,
    text_hidden: int = 64,
    text_heads: int = 4,
    initializer_factor: float = 1.0,
    vision_intermediate: int | None = None,
    text_intermediate: int | None = None,
    text_kv_heads: int | None = None,
) -> LlavaConfig:
    """A small LLaVA-1.5-shaped config: CLIP ViT with a CLS token, 2-layer MLP projector, Llama."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
        initializer_factor=initializer_factor,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or text_hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads or max(1, text_heads // 2),
        max_position_embeddings=4096,
        pad_token_id=pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=pad_token_id,
    )


def _config_for(
    tokenizer: PreTrainedTokenizerFast, vocab_size: int | None = None, **options: int | float
) -> LlavaConfig:
    """:func:`tiny_llava_config` with ``tokenizer``'s image and pad tokens; ``vocab_size`` may exceed its size."""
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size must cover the tokenizer's {len(tokenizer)} tokens, got {vocab_size}")
    return tiny_llava_config(
        vocab_size=vocab_size or len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        **options,
    )


def _seeded_model(
    model_class: type,
    config: object,
    seed: int,
    attn_implementation: str,
    tokenizer: PreTrainedTokenizerFast,
    dtype: torch.dtype,
) -> torch.nn.Module:
    """``model_class(config)`` in eval mode, weights drawn from ``seed`` (the global generator is left as it was)."""
    compat.set_attention_implementation(config, attn_implementation)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_class(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.to(dtype).eval()


def build_tiny_llava(
    seed: int = 0,
    image_size: int = 84,
    patch_size: int = 7,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
    **config_options: int | float,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random tiny LLaVA and its processor; the same ``seed`` gives the same weights.

    ``vocab_size`` may exceed the tokenizer's (a model-sized embedding and output layer for timing).
    """
    processor = build_processor(image_size, patch_size)
    tokenizer = processor.tokenizer
    config = _config_for(tokenizer, vocab_size, image_size=image_size, patch_size=patch_size, **config_options)
    model = _seeded_model(LlavaForConditionalGeneration, config, seed, attn_implementation, tokenizer, dtype)
    return model, processor


def save_tiny_llava(directory: str | Path, seed: int = 0, **options: int | float) -> Path:
    """Build a tiny random LLaVA and save model + processor with ``save_pretrained``."""
    model, processor = build_tiny_llava(seed=seed, **options)
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


QWEN_VERSIONS = ("2", "2.5", "3", "3-moe", "3.5")


class FrameVideoProcessor:
    """A video processor made of an image processor applied frame by frame: ``pixel_values_videos`` ``(B, F, C, H, W)``.

    transformers' own video processors need torchvision, which has no CPU build on the project's
    machines; tiny models use this stand-in. Real checkpoints bring their own video processor.
    """

    model_input_names = ("pixel_values_videos",)

    def __init__(self, image_processor: object) -> None:
        self.image_processor = image_processor

    def __call__(self, videos: object, return_tensors: str | None = "pt", **kwargs: object) -> BatchFeature:
        frames = [
            self.image_processor(list(video), return_tensors="pt")["pixel_values"]
            for video in make_batched_videos(videos)
        ]
        if len({tuple(video.shape) for video in frames}) > 1:
            raise ValueError("the videos of one call must have the same number of frames and frame size")
        return BatchFeature({"pixel_values_videos": torch.stack(frames)}, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, object]:
        return {"video_processor_type": type(self).__name__}


class QwenFrameVideoProcessor(FrameVideoProcessor):
    """Qwen2-VL's video layout from its image processor (a stand-in, as :class:`FrameVideoProcessor`).

    Frames are resized and normalised as images; temporal patch ``j`` takes frame
    ``temporal_patch_size · j + k`` in its temporal slot ``k``, as Qwen2-VL's video processor lays
    them out (a video with a frame count that is not a multiple repeats its last frame).
    """

    def __init__(self, image_processor: object, fps: float = 2.0) -> None:
        super().__init__(image_processor)
        self.merge_size = image_processor.merge_size
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.patch_size = image_processor.patch_size
        self.fps = fps

    def __call__(self, videos: object, return_tensors: str | None = "pt", **kwargs: object) -> BatchFeature:
        slots, side = self.temporal_patch_size, self.patch_size
        patches, grids, metadata = [], [], []
        for video in make_batched_videos(videos):
            frames = list(video)
            frames += frames[-1:] * (-len(frames) % slots)
            processed = self.image_processor(frames, return_tensors="pt")
            _, rows, columns = processed["image_grid_thw"][0].tolist()
            # Each frame's patches hold the frame in every temporal slot: (t, slots, n, C, slots, p, p).
            per_frame = processed["pixel_values"].view(
                len(frames) // slots, slots, rows * columns, -1, slots, side, side
            )
            temporal = torch.stack([per_frame[:, k, :, :, k] for k in range(slots)], dim=3)
            patches.append(temporal.reshape(-1, temporal[0, 0].numel()))
            grids.append([len(frames) // slots, rows, columns])
            indices = list(range(len(video)))  # the frames sampled (Qwen3-VL's timestamps read them)
            metadata.append(VideoMetadata(total_num_frames=len(frames), fps=self.fps, frames_indices=indices))
        data = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}
        return BatchFeature({**data, "video_metadata": metadata}, tensor_type=return_tensors)


def _image_only(processor_class: type) -> type:
    """``processor_class`` without a torchvision video processor: none, or the :class:`FrameVideoProcessor` stand-in."""

    class ImageOnlyProcessor(processor_class):
        def check_argument_for_proper_class(self, argument_name: str, argument: object) -> object:
            if argument_name == "video_processor" and (argument is None or isinstance(argument, FrameVideoProcessor)):
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

        def to_dict(self) -> dict[str, object]:
            output = super().to_dict()
            if isinstance(output.get("video_processor"), FrameVideoProcessor):
                output["video_processor"] = output["video_processor"].to_dict()
            return output

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_class.__name__
    return ImageOnlyProcessor


def _decoder_config(
    tokenizer: PreTrainedTokenizerFast,
    vocab_size: int | None,
    hidden: int,
    intermediate: int | None,
    layers: int,
    heads: int,
    kv_heads: int | None,
) -> dict[str, object]:
    """A decoder's text config: the tokenizer's special ids, the widths (intermediate: twice ``hidden``,
    key-value heads: half the heads, by default); ``vocab_size`` may exceed the tokenizer's."""
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size must cover the tokenizer's {len(tokenizer)} tokens, got {vocab_size}")
    return {
        "vocab_size": vocab_size or len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": intermediate or hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or max(1, heads // 2),
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def build_tiny_qwen(
    version: str = "2",
    seed: int = 0,
    patch_size: int = 4,
    vision_layers: int = 6,
    vision_hidden: int = 32,
    vision_heads: int = 4,
    text_layers: int = 4,
    text_hidden: int = 64,
    text_heads: int = 4,
    window_size: int = 16,
    max_pixels: int = 64 * 64,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    vision_intermediate: int | None = None,
    text_intermediate: int | None = None,
    text_kv_heads: int | None = None,
    vocab_size: int | None = None,
    deepstack_layers: list[int] | None = None,
    position_grid: int = 8,
) -> tuple[torch.nn.Module, Qwen2VLProcessor | Qwen3VLProcessor]:
    """A random tiny Qwen2-VL (``"2"``), Qwen2.5-VL (``"2.5"``), Qwen3-VL (``"3"``, ``"3-moe"``) or Qwen3.5 (``"3.5"``).

    Images are resized by the processor's own dynamic-resolution rule (multiples of
    ``2 * patch_size``, at most ``max_pixels``); Qwen2.5-VL's windows span ``window_size`` pixels.
    Widths default to twice the hidden sizes and half as many key-value heads; ``vocab_size`` may
    exceed the tokenizer's (a model-sized embedding and output layer for timing). Qwen3-VL only:
    ``deepstack_layers`` (default: three blocks spread over the tower) and the side of its learned
    position grid, ``position_grid``.
    """
    if version not in QWEN_VERSIONS:
        raise ValueError(f"unknown Qwen version {version!r}; available: {', '.join(QWEN_VERSIONS)}")
    tokenizer = build_tokenizer(special_tokens=QWEN_SPECIAL_TOKENS)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": (2 * patch_size) ** 2, "longest_edge": max_pixels},
    )
    vision_intermediate = vision_intermediate or vision_hidden * 2
    head_dim = text_hidden // text_heads
    quarter = head_dim // 2 // 4
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
    }
    text = _decoder_config(
        tokenizer, vocab_size, text_hidden, text_intermediate, text_layers, text_heads, text_kv_heads
    )
    text["rope_parameters"] = rope
    vision = {
        "depth": vision_layers,
        "num_heads": vision_heads,
        "patch_size": patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    if version == "2":
        if vision_intermediate % vision_hidden:
            raise ValueError(f"Qwen2-VL needs vision_intermediate to be a multiple of vision_hidden ({vision_hidden})")
        vision.update(embed_dim=vision_hidden, hidden_size=text_hidden, mlp_ratio=vision_intermediate // vision_hidden)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model_class, processor_class = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    elif version == "3.5":
        # Qwen3-VL's tower without DeepStack; a hybrid language model: Gated DeltaNet layers, every
        # fourth layer full attention.
        vision.update(
            hidden_size=vision_hidden,
            intermediate_size=vision_intermediate,
            out_hidden_size=text_hidden,
            num_position_embeddings=position_grid**2,
        )
        rope.update(mrope_interleaved=True, partial_rotary_factor=0.5)
        text.update(
            head_dim=head_dim,
            linear_key_head_dim=head_dim,
            linear_value_head_dim=head_dim,
            linear_num_key_heads=max(1, text_heads // 2),
            linear_num_value_heads=text_heads,
        )
        config = Qwen3_5Config(text_config=text, vision_config=vision, **ids)
        model_class, processor_class = Qwen3_5ForConditionalGeneration, Qwen3VLProcessor
    elif version.startswith("3"):
        # DeepStack: intermediate vision blocks feed the first decoder layers; the learned position
        # grid is interpolated to each image's patch grid.
        vision.update(
            hidden_size=vision_hidden,
            intermediate_size=vision_intermediate,
            out_hidden_size=text_hidden,
            num_position_embeddings=position_grid**2,
            deepstack_visual_indexes=deepstack_layers
            or sorted({min(1, vision_layers - 1), vision_layers // 2, max(0, vision_layers - 2)}),
        )
        rope["mrope_interleaved"] = True
        text.update(head_dim=head_dim)
        if version == "3-moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text_hidden, decoder_sparse_step=1)
            config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)
            model_class = Qwen3VLMoeForConditionalGeneration
        else:
            config = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
            model_class = Qwen3VLForConditionalGeneration
        processor_class = Qwen3VLProcessor
    else:
        vision.update(
            hidden_size=vision_hidden,
            intermediate_size=vision_intermediate,
            out_hidden_size=text_hidden,
            window_size=window_size,
            fullatt_block_indexes=[vision_layers // 2 - 1, vision_layers - 1],
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model_class, processor_class = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    model = _seeded_model(model_class, config, seed, attn_implementation, tokenizer, dtype)
    processor = _image_only(processor_class)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=QwenFrameVideoProcessor(image_processor),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor


def _anyres_pinpoints(image_size: int) -> list[list[int]]:
    """Anyres resolutions of a tiny model: a base view plus a grid of up to 2x2 crops of ``image_size``."""
    return [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]


def build_tiny_llava_next(
    seed: int = 0,
    image_size: int = 84,
    patch_size: int = 7,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    video: bool = False,
    **config_options: int | float,
) -> tuple[LlavaNextForConditionalGeneration | LlavaNextVideoForConditionalGeneration, LlavaNextProcessor]:
    """A random tiny LLaVA-NeXT (anyres: a base view plus a grid of up to 2x2 crops) and its processor.

    ``video``: LLaVA-NeXT-Video instead (frames pooled 2x2 by averaging; a frame-by-frame video processor).
    Three text layers by default: FlowCut's second stage prunes after decoder layer 1 and needs a later one.
    """
    config_options.setdefault("text_layers", 3)
    pinpoints = _anyres_pinpoints(image_size)
    tokenizer = build_tokenizer(special_tokens=["<video>"] if video else None)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    text = {
        "tokenizer": tokenizer,
        "patch_size": patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
    }
    llava = _config_for(tokenizer, image_size=image_size, patch_size=patch_size, **config_options)
    shared = {
        "vision_config": llava.vision_config,
        "text_config": llava.text_config,
        "image_token_id": llava.image_token_id,
        "image_grid_pinpoints": pinpoints,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "pad_token_id": tokenizer.pad_token_id,
    }
    if not video:
        processor = LlavaNextProcessor(image_processor=image_processor, chat_template=CHAT_TEMPLATE, **text)
        config = LlavaNextConfig(**shared)
        model = _seeded_model(LlavaNextForConditionalGeneration, config, seed, attn_implementation, tokenizer, dtype)
        return model, processor
    frames = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = _image_only(LlavaNextVideoProcessor)(
        video_processor=FrameVideoProcessor(frames),
        image_processor=image_processor,
        chat_template=VIDEO_CHAT_TEMPLATE,
        **text,
    )
    video_token = tokenizer.convert_tokens_to_ids("<video>")
    config = LlavaNextVideoConfig(
        video_token_id=video_token, spatial_pool_mode="average", spatial_pool_stride=2, **shared
    )
    model = _seeded_model(LlavaNextVideoForConditionalGeneration, config, seed, attn_implementation, tokenizer, dtype)
    return model, processor


def build_tiny_llava_next_video(**options: object) -> tuple[LlavaNextVideoForConditionalGeneration, LlavaNextProcessor]:
    """A random tiny LLaVA-NeXT-Video and its processor (:func:`build_tiny_llava_next` with ``video=True``)."""
    return build_tiny_llava_next(video=True, **options)


def build_tiny_llava_onevision(
    seed: int = 0,
    image_size: int = 84,
    patch_size: int = 7,
    vision_layers: int = 6,
    vision_hidden: int = 32,
    vision_heads: int = 4,
    max_crops: int = 9,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    **text_options: int,
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A random tiny LLaVA-OneVision (SigLIP tower without CLS, anyres up to 2x2 crops) and its processor.

    Three text layers by default: FlowCut's second stage prunes after decoder layer 1 and needs a later one.
    """
    text_options.setdefault("text_layers", 3)
    pinpoints = _anyres_pinpoints(image_size)
    tokenizer = build_tokenizer(special_tokens=["<video>"])
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    patches = (image_size // patch_size) ** 2
    frame_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = _image_only(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=FrameVideoProcessor(frame_processor),
        num_image_tokens=patches,
        vision_feature_select_strategy="full",
        chat_template=VIDEO_CHAT_TEMPLATE,
        vision_aspect_ratio=f"anyres_max_{max_crops}",
    )
    llava = _config_for(tokenizer, **text_options)
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=llava.text_config,
        image_token_id=llava.image_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_crops}",
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _seeded_model(LlavaOnevisionForConditionalGeneration, config, seed, attn_implementation, tokenizer, dtype)
    return model, processor


def build_tiny_video_llava(
    seed: int = 0,
    image_size: int = 84,
    patch_size: int = 7,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
    **config_options: int | float,
) -> tuple[VideoLlavaForConditionalGeneration, VideoLlavaProcessor]:
    """A random tiny Video-LLaVA (separate CLIP image and video towers) and its processor.

    The processor's video side is the :class:`FrameVideoProcessor` stand-in (frames as images);
    ``vocab_size`` as for :func:`build_tiny_llava`.
    """
    tokenizer = build_tokenizer(special_tokens=["<video>"])
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = _image_only(VideoLlavaProcessor)(
        image_processor=image_processor,
        video_processor=FrameVideoProcessor(image_processor),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VIDEO_CHAT_TEMPLATE,
    )
    llava = _config_for(tokenizer, vocab_size, image_size=image_size, patch_size=patch_size, **config_options)
    config = VideoLlavaConfig(
        vision_config=llava.vision_config,
        text_config=llava.text_config,
        image_token_index=llava.image_token_id,
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = _seeded_model(VideoLlavaForConditionalGeneration, config, seed, attn_implementation, tokenizer, dtype)
    return model, processor


def _marker_tokenizer(markers: dict[str, str]) -> PreTrainedTokenizerFast:
    """:func:`build_tokenizer` with ``markers`` as named special tokens (``tokenizer.boi_token``, ``…_id``), as
    Gemma 3's and InternVL's processors read them."""
    base = build_tokenizer(special_tokens=list(markers.values()))
    return PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=markers,
    )


GEMMA3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>\n", "<start_of_image> ")
"""LLaVA's template with Gemma 3's image marker (the processor expands it into the image's soft tokens)."""


def build_tiny_gemma3(
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 4,
    tokens_per_image: int = 16,
    vision_layers: int = 6,
    vision_hidden: int = 32,
    vision_heads: int = 4,
    text_layers: int = 4,
    text_hidden: int = 64,
    text_heads: int = 4,
    sliding_window: int = 8,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    vision_intermediate: int | None = None,
    text_intermediate: int | None = None,
    text_kv_heads: int | None = None,
    text_head_dim: int | None = None,
    vocab_size: int | None = None,
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """A random tiny Gemma 3: a SigLIP tower of ``(image_size / patch_size)²`` patches, pooled to ``tokens_per_image``.

    The language model alternates sliding-window layers (``sliding_window`` tokens) with a global
    layer last, as Gemma 3's layer pattern does. Widths default to twice the hidden sizes.
    """
    tokenizer = _marker_tokenizer(
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    )
    text = _decoder_config(
        tokenizer, vocab_size, text_hidden, text_intermediate, text_layers, text_heads, text_kv_heads
    )
    text.update(
        head_dim=text_head_dim or text_hidden // text_heads,
        sliding_window=sliding_window,
        layer_types=["sliding_attention"] * (text_layers - 1) + ["full_attention"],
    )
    vision = {
        "hidden_size": vision_hidden,
        "intermediate_size": vision_intermediate or vision_hidden * 2,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "vision_use_head": False,
    }
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tokens_per_image,
        image_token_id=tokenizer.image_token_id,
        boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.eoi_token_id,
    )
    model = _seeded_model(Gemma3ForConditionalGeneration, config, seed, attn_implementation, tokenizer, dtype)
    # Gemma 3 initialises its projection to zeros (every image the same tokens): draw it like the other weights.
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        projection.copy_(torch.randn(projection.shape, generator=generator) * config.text_config.initializer_range)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        image_seq_length=tokens_per_image,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    return model, processor


INTERNVL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>\n", "<IMG_CONTEXT>\n")
"""LLaVA's template with InternVL's image placeholder (the processor expands it into the image's tiles' tokens)."""


def build_tiny_internvl(
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 4,
    max_tiles: int = 4,
    vision_layers: int = 6,
    vision_hidden: int = 32,
    vision_heads: int = 4,
    text_layers: int = 4,
    text_hidden: int = 64,
    text_heads: int = 4,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    vision_intermediate: int | None = None,
    text_intermediate: int | None = None,
    text_kv_heads: int | None = None,
    vocab_size: int | None = None,
) -> tuple[InternVLForConditionalGeneration, InternVLProcessor]:
    """A random tiny InternVL: tiles of ``image_size`` (up to ``max_tiles`` plus a thumbnail) through an InternViT of
    ``(image_size / patch_size)²`` patches with CLS, pixel-shuffled 2×2 into a quarter as many tokens; a Qwen2 decoder.
    """
    tokenizer = _marker_tokenizer(
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        }
    )
    text = _decoder_config(
        tokenizer, vocab_size, text_hidden, text_intermediate, text_layers, text_heads, text_kv_heads
    )
    vision = {
        "hidden_size": vision_hidden,
        "intermediate_size": vision_intermediate or vision_hidden * 2,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "image_size": [image_size, image_size],
        "patch_size": [patch_size, patch_size],
    }
    config = InternVLConfig(
        vision_config=vision,
        text_config={"model_type": "qwen2", **text},
        image_token_id=tokenizer.context_image_token_id,
        downsample_ratio=0.5,
    )
    model = _seeded_model(InternVLForConditionalGeneration, config, seed, attn_implementation, tokenizer, dtype)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=True, min_patches=1, max_patches=max_tiles
    )
    # Videos: frames resized to one tile each (InternVL's video processor does not tile), the stand-in of
    # FrameVideoProcessor for its torchvision-based one.
    frames = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=False)
    processor = _image_only(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=FrameVideoProcessor(frames),
        image_seq_length=(image_size // patch_size // 2) ** 2,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return model, processor
