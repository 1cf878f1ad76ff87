"""The part of a model family that is the same for every family: installing FlowCut on one instance.

A family declares which methods of the inner model it replaces (:meth:`ModelFamily.entry_points`:
a name and a handler that receives the stock method first) and what it does before each forward
pass (:meth:`ModelFamily.before_forward`). The runtime installs the replacements and the pre-hook
through one :class:`~flowcut.runtime.InstancePatch`, so removal restores the instance from its own
structure, a pre-existing instance override included, and the language-model pruner where there is one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from flowcut import compat
from flowcut.methods import get_method
from flowcut.runtime.attention import check_attention
from flowcut.runtime.encoding import stock_tuple
from flowcut.runtime.instance import InstancePatch

if TYPE_CHECKING:
    from flowcut.config import FlowCutConfig
    from flowcut.runtime.language import DecoderPruner
    from flowcut.trace import PruningTrace

EncoderWork = tuple[list[list[int]], int | None]
"""Per encoder pass of a prompt (an image, a crop, a frame, a temporal slice), the patches each layer
processed; and the units the projector maps where they are not the tokens entering the language model (None)."""

Handler = Callable[..., Any]
"""``handler(stock, **arguments)``: FlowCut's version of an inner-model method; ``stock`` is what it replaces."""


def _replacement(handler: Handler) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The instance-level method that calls ``handler`` with the stock method first.

    It carries the stock method's signature: ``generate`` reads it to choose which of its inputs to
    hand over, so it hands over what the stock method would get. The handler receives every argument
    by the name the stock method gives it. Where the method being replaced takes anything
    (``*args``: an override someone installed before), the handler's own parameters stand instead.
    """

    def make(stock: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(stock)
        if any(parameter.kind is parameter.VAR_POSITIONAL for parameter in signature.parameters.values()):
            own = list(inspect.signature(handler).parameters.values())[1:]  # all but ``stock``
            signature = signature.replace(parameters=own)
        rest = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

        def replacement(*args: Any, **kwargs: Any) -> Any:
            arguments = dict(signature.bind(*args, **kwargs).arguments)
            extra = arguments.pop(rest, {}) if rest else {}
            # The handler and the stock method it calls work on output objects; a caller that asked for a
            # tuple (``return_dict=False``) gets the handler's output as the stock method's tuple.
            holder = arguments if "return_dict" in arguments else extra
            as_tuple = holder.get("return_dict", True) is False
            if as_tuple:
                holder["return_dict"] = True
            output = handler(stock, **arguments, **extra)
            return stock_tuple(output) if as_tuple else output

        replacement.__name__ = getattr(stock, "__name__", "replacement")
        replacement.__doc__ = f"{replacement.__name__}, through FlowCut (installed by flowcut.apply on this instance)."
        replacement.__signature__ = signature  # type: ignore[attr-defined]
        return replacement

    return make


class ModelFamily:
    """One model instance with FlowCut installed: its replaced entry points, its pre-hook, its pruner."""

    model_classes: ClassVar[tuple[type, ...]]
    """The ``*ForConditionalGeneration`` classes the family covers."""
    family_name: ClassVar[str]
    """How errors and docs name the family."""
    config: FlowCutConfig
    """The settings FlowCut runs with on this instance (set by the family)."""

    def __init__(self, model: torch.nn.Module, on_trace: Callable[[PruningTrace], None]) -> None:
        self.model = model
        self.base = model.model
        self.on_trace = on_trace
        self.patch = InstancePatch()
        self.pruner: DecoderPruner | None = None
        self.stock: dict[str, Callable[..., Any]] = {}
        """The inner model's methods as they were before :meth:`install`, by name."""

    def entry_points(self) -> dict[str, Handler]:
        """The inner model's methods FlowCut replaces on this instance, each with its handler.

        A name is a method of the inner model, or ``"submodule.method"`` for one of its submodules.
        """
        raise NotImplementedError

    def before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The forward pre-hook (``with_kwargs``): check the pass, and return new ``(args, kwargs)`` or None."""
        raise NotImplementedError

    @classmethod
    def encoder_work(cls, model: torch.nn.Module, trace: PruningTrace | None, inputs: Any) -> EncoderWork | None:
        """What the vision encoder ran for the one image or video of ``inputs`` (the benchmark's FLOP count).

        ``trace``: the pass's trace, None for the stock model. Passes the trace does not describe (the
        stock model, or media the encoder stage left whole) ran every layer over every patch. None: the
        analytic count does not cover this family.
        """
        return None

    def install(self) -> None:
        """Replace the entry points and hook the forward pass of this instance (never its class)."""
        method = get_method(self.config.method)
        if method.prunes and method.stage == "encoder":
            check_attention(compat.attention_implementation(self.model.config.vision_config))
        if self.pruner is not None:
            check_attention(compat.attention_implementation(self.model.config.text_config), "the language model")
        for name, handler in self.entry_points().items():
            owner, _, method = name.rpartition(".")  # "language_model._deepstack_process": a submodule's method
            target = self.base.get_submodule(owner) if owner else self.base
            self.stock[name] = self.patch.override(target, method, _replacement(handler))
        self.patch.hook(self.model.register_forward_pre_hook(self.before_forward, with_kwargs=True))
        if self.pruner is not None:
            self.pruner.install()

    def uninstall(self) -> None:
        """Restore the instance exactly as it was before :meth:`install`."""
        self.patch.restore()
        self.stock = {}
        if self.pruner is not None:
            self.pruner.remove()
