"""FastV (arXiv 2403.06764), K = 2, as SPEC §7 defines it: prune inside the language model.

Decoder layers 0 and 1 see every visual token; each image's ``keep`` visual tokens that receive the
most attention (head-averaged) from the last prompt token in layer 1 continue, in positional order,
to layers 2 and later. The encoder is untouched.
"""

from __future__ import annotations

from flowcut.methods import EncoderCall, Method, MethodOutput, register


@register
class FastV(Method):
    name = "fastv"
    summary = "FastV (arXiv 2403.06764): after decoder layer 1, keep the visual tokens the last token attends to most"
    stage = "language"
    language_layer = 1
    language_score = "attention"

    def run(self, call: EncoderCall) -> MethodOutput:
        raise RuntimeError("FastV prunes inside the language model; the model family runs its stock encoder")
