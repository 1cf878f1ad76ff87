"""The attention seam: a recording attention function registered with transformers' AttentionInterface.

During FlowCut's own encoder pass (and only then) the vision tower's attention implementation is
switched to ``flowcut_recording``. That function hands the layer's query/key/value tensors to the
pass's :class:`~flowcut.core.encoder_stage.AttentionRecorder` and then calls the implementation the
model was configured with (SDPA, FlashAttention, eager, …), so the layer itself is computed exactly
as without FlowCut and no attention matrix is materialised. Registering a new name adds an entry to
the registry; no library class is patched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from flowcut.compat import (
    attention_function,
    attention_implementation,
    register_attention,
    set_attention_implementation,
)
from flowcut.core.encoder_stage import AttentionRecorder

RECORDING_ATTENTION = "flowcut_recording"
CONTEXT_ATTRIBUTE = "_flowcut_attention_context"


def _recording_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    flowcut_recorder: AttentionRecorder | None = None,
    flowcut_attention: Callable[..., Any] | None = None,
    flowcut_implementation: str | None = None,
    **kwargs: Any,
) -> Any:
    if flowcut_attention is None:
        # Modules that do not forward extra keyword arguments to their attention function (SigLIP's)
        # carry the pass's settings on the instance for the duration of the layer (attention_context).
        context = getattr(module, CONTEXT_ATTRIBUTE, None)
        if context is not None:
            flowcut_recorder, flowcut_attention, flowcut_implementation, padding_mask = context
            if attention_mask is None:  # a layer that takes no mask (InternViT) gets the pass's padding mask here
                attention_mask = padding_mask
    if flowcut_attention is None:
        # FlowCut's encoder pass switches the tower's implementation for its duration; a second thread
        # running the same model meanwhile lands here.
        raise RuntimeError(
            f"attention implementation {RECORDING_ATTENTION!r} runs only inside FlowCut's own encoder pass; if "
            "several threads call one pruned model, give each thread its own model (one model must not be "
            "shared across threads while FlowCut is applied)"
        )
    if flowcut_recorder is not None:
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        flowcut_recorder.capture(query, key, value, scaling)
    config = getattr(module, "config", None)
    if flowcut_implementation is None or config is None:
        return flowcut_attention(module, query, key, value, attention_mask, *args, **kwargs)
    # Implementations that read their own name from the config (FlashAttention does) must see it.
    recording = attention_implementation(config)
    set_attention_implementation(config, flowcut_implementation)
    try:
        return flowcut_attention(module, query, key, value, attention_mask, *args, **kwargs)
    finally:
        set_attention_implementation(config, recording)


register_attention(RECORDING_ATTENTION, _recording_attention)


def _is_flash(implementation: str | None) -> bool:
    return implementation is not None and implementation.startswith("flash")


def resolve_attention(implementation: str | None, eager: Callable[..., Any]) -> Callable[..., Any]:
    """The attention function a module configured with ``implementation`` would call.

    Only implementations whose padding masks :func:`key_padding_mask` can build are accepted.
    """
    if implementation in (None, "eager"):
        return eager
    check_attention(implementation)
    return attention_function(implementation, eager)


def check_attention(implementation: str | None, where: str = "the vision tower") -> None:
    """Refuse an attention implementation whose padding masks FlowCut cannot build (checked at apply and per pass)."""
    if implementation not in (None, "eager", "sdpa") and not _is_flash(implementation):
        raise ValueError(
            f"FlowCut runs with eager, sdpa or flash attention in {where}, not {implementation!r}: "
            "model.set_attn_implementation('sdpa') selects a supported one"
        )


@contextmanager
def recording_attention(configs: Sequence[Any]) -> Iterator[None]:
    """Switch the given attention configs to the recording implementation for the duration of a pass."""
    previous = [attention_implementation(config) for config in configs]
    try:
        for config in configs:
            set_attention_implementation(config, RECORDING_ATTENTION)
        yield
    finally:
        for config, implementation in zip(configs, previous, strict=True):
            set_attention_implementation(config, implementation)


def key_padding_mask(alive: torch.Tensor, implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """The padding mask an attention implementation expects for a ragged batch of non-causal tokens.

    FlashAttention takes a 2-D ``(B, K)`` mask of real tokens; the others an additive
    ``(B, 1, 1, K)`` mask that is 0 for real keys and the dtype's minimum for padding.
    """
    if _is_flash(implementation):
        return alive.to(torch.int32)
    mask = torch.zeros(alive.shape, dtype=dtype, device=alive.device)
    mask = mask.masked_fill(~alive, torch.finfo(dtype).min)
    return mask[:, None, None, :]


@contextmanager
def attention_context(
    module: torch.nn.Module,
    recorder: AttentionRecorder | None,
    attention: Callable[..., Any],
    implementation: str | None,
    padding_mask: torch.Tensor | None = None,
) -> Iterator[None]:
    """Give one attention module the pass's recorder and delegate attention while it runs (instance only).

    ``padding_mask``: the mask of a ragged batch, for layers that do not pass one to their attention.
    """
    setattr(module, CONTEXT_ATTRIBUTE, (recorder, attention, implementation, padding_mask))
    try:
        yield
    finally:
        delattr(module, CONTEXT_ATTRIBUTE)
