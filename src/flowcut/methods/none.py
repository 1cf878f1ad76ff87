"""The unpruned reference: every patch reaches the language model (the family's stock path)."""

from __future__ import annotations

from flowcut.methods import EncoderCall, Method, MethodOutput, register


@register
class NoPruning(Method):
    name = "none"
    summary = "no pruning: the stock model, every patch (keep is ignored)"
    prunes = False

    def run(self, call: EncoderCall) -> MethodOutput:
        raise RuntimeError("method 'none' runs the model family's stock path; it has no selection step")
