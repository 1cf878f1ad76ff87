"""Public entry points: ``apply`` one pruning configuration to one model instance, and undo it."""

from __future__ import annotations

from typing import Any

import torch

from flowcut import compat
from flowcut.config import FlowCutConfig
from flowcut.families import FAMILIES, family_of
from flowcut.trace import PruningTrace

_HANDLE_ATTRIBUTE = "_flowcut_handle"


def supported_model_classes() -> list[str]:
    """Names of the model classes :func:`apply` accepts."""
    return [cls.__name__ for family in FAMILIES for cls in family.model_classes]


class FlowCutHandle:
    """FlowCut installed on one model instance; :meth:`remove` (or leaving a ``with`` block) undoes it."""

    def __init__(self, model: torch.nn.Module, config: FlowCutConfig, processor: Any = None) -> None:
        family = family_of(model)
        if family is None:
            raise TypeError(
                f"FlowCut does not support {type(model).__name__}; supported model classes: "
                f"{', '.join(supported_model_classes())}"
            )
        if getattr(model, _HANDLE_ATTRIBUTE, None) is not None:
            raise RuntimeError("FlowCut is already applied to this model; call handle.remove() first")
        self.model = model
        self.config = config
        self.processor = processor
        self.last_trace: PruningTrace | None = None
        self._family = family(model, config, self._record_trace)
        self._family.install()
        try:
            if processor is not None:
                self._family.patch_processor(processor)
        except Exception:
            self._family.uninstall()
            raise
        setattr(model, _HANDLE_ATTRIBUTE, self)

    def _record_trace(self, trace: PruningTrace) -> None:
        self.last_trace = trace

    @property
    def active(self) -> bool:
        """Whether FlowCut is still installed on the model."""
        return getattr(self.model, _HANDLE_ATTRIBUTE, None) is self

    @property
    def tokens_per_image(self) -> int | float:
        """Visual tokens per image that reach the language model (a ratio where ``keep`` is one and images differ)."""
        return self._family.tokens_per_image

    @property
    def prunes_in_language_model(self) -> bool:
        """Whether a decoder layer drops visual tokens (FastV; FlowCut on the two-stage families), so the
        tokens kept depend on the prompt's last token."""
        return self._family.pruner is not None

    def remove(self) -> None:
        """Restore the model (and processor) to their exact original behaviour. Idempotent."""
        if not self.active:
            return
        self._family.uninstall()  # the processor too: the family adapted it through the same InstancePatch
        delattr(self.model, _HANDLE_ATTRIBUTE)

    def __deepcopy__(self, memo: dict) -> FlowCutHandle:
        # The installed methods are closures over this instance: a copy would run the original's weights.
        raise TypeError(
            "a model with FlowCut applied cannot be deep-copied (the copy would encode with the original's "
            "weights): copy it before flowcut.apply, or handle.remove() first and apply to each copy"
        )

    def __enter__(self) -> FlowCutHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        name = type(self.model).__name__
        return f"FlowCutHandle({name}, keep={self.config.keep}, method={self.config.method!r}, {state})"


def apply(
    model: torch.nn.Module,
    processor: Any = None,
    keep: int | None = None,
    method: str | None = None,
    config: FlowCutConfig | None = None,
    **options: Any,
) -> FlowCutHandle:
    """Prune ``model``'s visual tokens to ``keep`` per image; returns a handle that can undo it.

    Pass the model's ``processor`` so prompts carry ``keep`` image placeholders per image. Either
    give ``keep`` (default 64), ``method`` (default ``"flowcut"``) and ``options``, or a ready
    :class:`FlowCutConfig`, not both.
    """
    compat.check_transformers_version()
    if config is None:
        config = FlowCutConfig(keep=64 if keep is None else keep, method=method or "flowcut", **options)
    elif keep is not None or options or method is not None:
        raise ValueError("pass either config= or keep/method/options, not both")
    return FlowCutHandle(model, config, processor)


def check_applicable(model: torch.nn.Module, configs: list[FlowCutConfig]) -> None:
    """Raise the error :func:`apply` would raise for the first configuration this model cannot run.

    Each configuration is applied and removed at once, so a long run (eval, bench) fails before it starts.
    """
    for config in configs:
        apply(model, config=config).remove()


def get_handle(model: torch.nn.Module) -> FlowCutHandle | None:
    """The active handle of a model FlowCut was applied to, or None."""
    return getattr(model, _HANDLE_ATTRIBUTE, None)


def flowcut(model: torch.nn.Module, target_num: int = 64) -> torch.nn.Module:
    """Compatibility entry point with the authors' package: ``model = flowcut(model, target_num=64)``.

    Returns the same model with FlowCut applied; :func:`get_handle` gives its handle. Build prompts
    with a processor passed to :func:`apply`, or ``target_num`` image placeholders per image.
    """
    apply(model, keep=target_num)
    return model
