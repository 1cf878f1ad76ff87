"""Analytic FLOPs of a LLaVA- or Qwen-VL-style prefill in the paper's convention (the benchmark's yardstick).

Convention: 2 FLOPs per multiply-add; matrix products only (norms, activations, softmax and
biases are not counted); the vision encoder is counted layer by layer with the tokens each layer
really processes (so progressive pruning is credited layer by layer); attention scores and the
weighted sum are counted over the full square of tokens; the language model's feed-forward has
three matrices (gate, up, down) and its head is counted for ``head_tokens`` positions (1 in
``generate``'s prefill, every position in a plain forward). The prompt length is part of the
result, never implied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class VisionShape:
    """A ViT: patch embedding, then ``layers`` pre-norm blocks with full attention and an MLP.

    The defaults describe CLIP (one CLS token, a two-matrix MLP, 2-D patches); Qwen2-VL's tower
    has no CLS token and 3-D patches of two frames (an image is repeated).
    """

    hidden: int
    intermediate: int
    layers: int
    patch_size: int
    num_patches: int
    channels: int = 3
    class_tokens: int = 1
    """Tokens every layer processes besides the patches (CLIP's CLS)."""
    temporal_patch: int = 1
    """Frames per patch."""


@dataclass(frozen=True)
class ProjectorShape:
    """The two-layer MLP between encoder and language model: ``input → hidden → output`` per token it maps.

    LLaVA maps every patch (``vision → text → text``); Qwen2-VL's merger maps each 2×2 group of
    patches, side by side (``4·vision → 4·vision → text``).
    """

    in_features: int
    hidden_features: int | None
    """None: one matrix ``input → output`` (Gemma 3's projection of its pooled tokens)."""
    out_features: int
    copies: int = 1
    """Projectors of this shape over the same tokens (Qwen3-VL: its merger and one DeepStack merger per
    DeepStack block)."""


@dataclass(frozen=True)
class TextShape:
    """A Llama-style decoder with grouped-query attention and a gated (three-matrix) feed-forward."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None
    """Width of one attention head where it is not ``hidden / heads`` (Gemma 3)."""


@dataclass(frozen=True)
class PrefillFlops:
    """FLOPs of one prefill, by part."""

    vision: int
    projector: int
    language: int

    @property
    def total(self) -> int:
        """All parts together."""
        return self.vision + self.projector + self.language


def vision_layer_flops(shape: VisionShape, tokens: int) -> int:
    """One encoder layer over ``tokens`` tokens (class tokens included)."""
    projections = 4 * tokens * shape.hidden * shape.hidden  # q, k, v, out
    attention = 2 * tokens * tokens * shape.hidden  # scores and weighted sum
    mlp = 2 * tokens * shape.hidden * shape.intermediate
    return 2 * (projections + attention + mlp)


def vision_flops(shape: VisionShape, tokens_per_layer: Sequence[int]) -> int:
    """The patch embedding plus every layer that runs, each over its live patches plus the class tokens."""
    patch_volume = shape.channels * shape.temporal_patch * shape.patch_size**2
    embedding = 2 * shape.num_patches * patch_volume * shape.hidden
    return embedding + sum(vision_layer_flops(shape, patches + shape.class_tokens) for patches in tokens_per_layer)


def scoring_flops(hidden: int, scored_tokens: Sequence[int]) -> int:
    """FlowCut's own score products: the CLS row of attention and of value similarity per scored layer.

    ``scored_tokens``: the patch count of each scored layer (CLS is added); each costs two
    ``1 × tokens × hidden`` products, computed as broadcast products (so a counter of matrix
    products does not see them). Everything else in the score is elementwise.
    """
    return sum(2 * 2 * (patches + 1) * hidden for patches in scored_tokens)


def projector_flops(shape: ProjectorShape, tokens: int) -> int:
    """The projector (each of its copies) over ``tokens`` of its inputs."""
    if shape.hidden_features is None:
        products = shape.in_features * shape.out_features
    else:
        products = shape.in_features * shape.hidden_features + shape.hidden_features * shape.out_features
    return 2 * shape.copies * tokens * products


def text_layer_flops(shape: TextShape, tokens: int) -> int:
    """One decoder layer over ``tokens`` tokens."""
    head_dim = shape.head_dim or shape.hidden // shape.heads
    projections = tokens * shape.hidden * (2 * shape.heads * head_dim + 2 * shape.kv_heads * head_dim)
    attention = 2 * tokens * tokens * shape.heads * head_dim
    mlp = 3 * tokens * shape.hidden * shape.intermediate
    return 2 * (projections + attention + mlp)


def text_flops(shape: TextShape, tokens_per_layer: Sequence[int], head_tokens: int = 1) -> int:
    """Every decoder layer over its tokens, plus the output head over ``head_tokens`` positions."""
    if len(tokens_per_layer) != shape.layers:
        raise ValueError(f"give one token count per decoder layer ({shape.layers}), got {len(tokens_per_layer)}")
    head = 2 * head_tokens * shape.hidden * shape.vocab
    return sum(text_layer_flops(shape, tokens) for tokens in tokens_per_layer) + head


def prefill_flops(
    vision: VisionShape,
    text: TextShape,
    vision_tokens_per_layer: Sequence[int] | Sequence[Sequence[int]],
    visual_tokens: int,
    prompt_tokens: int,
    language_tokens_per_layer: Sequence[int] | None = None,
    head_tokens: int = 1,
    projector: ProjectorShape | None = None,
    projector_tokens: int | None = None,
) -> PrefillFlops:
    """FLOPs of one prefill with one image or video.

    ``vision_tokens_per_layer``: patches each executed encoder layer processed (a pruning trace's
    ``tokens_per_layer``), or one such list per encoder pass (a video's frames, LLaVA-NeXT's crops);
    ``visual_tokens``: visual tokens entering the language model;
    ``prompt_tokens``: the text tokens around them. ``language_tokens_per_layer`` overrides the
    sequence length per decoder layer (pruning inside the language model). ``projector`` defaults
    to LLaVA's (vision → text → text), over ``projector_tokens`` (default: ``visual_tokens``;
    LLaVA-NeXT projects its crops' patches before it adds image-newline tokens).
    """
    sequence = visual_tokens + prompt_tokens
    per_layer = list(language_tokens_per_layer) if language_tokens_per_layer is not None else [sequence] * text.layers
    passes = vision_tokens_per_layer
    if not passes or not isinstance(passes[0], Sequence):
        passes = [passes]
    return PrefillFlops(
        vision=sum(vision_flops(vision, tokens) for tokens in passes),
        projector=projector_flops(
            projector or ProjectorShape(vision.hidden, text.hidden, text.hidden),
            visual_tokens if projector_tokens is None else projector_tokens,
        ),
        language=text_flops(text, per_layer, head_tokens),
    )
