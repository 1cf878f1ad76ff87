"""Encodings that describe themselves: what FlowCut's ``get_*_features`` hand to the prefill.

``generate`` encodes a prompt's images and videos through the instance's ``get_*_features``
before its prefill and passes the results back in ``mm_encoder_outputs``. The prefill must know
what the encoder stage made of each item (placeholder counts, kept units, budgets); rather than
remembering the last encoding on the family, each encoding is a :class:`MediaEncoding`, the
stock output class with the family's description of its items as a field.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from flowcut import compat


@dataclass
class MediaEncoding(compat.EncoderOutput):
    """A ``get_*_features`` result made while FlowCut was applied: the stock fields, and its items."""

    media: Any = None
    """The family's description of the encoded items (one entry per item in ``media[0]``)."""
    scoring_seconds: float | None = None
    """With ``time_scoring``: seconds the encoder stage spent scoring and selecting."""
    rows: int | None = None
    """``len(pooler_output)`` as encoded (per item, or per video frame as Video-LLaVA's stock path gives)."""


@cache
def _encoding_class(output_class: type) -> type:
    """The :class:`MediaEncoding` of a family's own output class (Qwen3-VL's adds DeepStack features)."""
    if output_class is compat.EncoderOutput:
        return MediaEncoding
    return dataclass(type(f"Media{output_class.__name__}", (MediaEncoding, output_class), {}))


def media_encoding(output: Any, media: tuple[Any, Any], scoring_seconds: float | None = None) -> Any:
    """``output`` (a ``get_*_features`` result) as a :class:`MediaEncoding` of ``media``, of its own class.

    Anything but an output object is returned as it is.
    """
    if not isinstance(output, compat.EncoderOutput):
        return output
    output_class, fields = type(output), dict(output.items())
    if isinstance(output, MediaEncoding):  # a stock path that went through another FlowCut entry point (Qwen3-VL's
        # videos are encoded by its get_image_features): describe the items of this call instead
        output_class = next(base for base in output_class.__mro__ if not issubclass(base, MediaEncoding))
        fields = {name: value for name, value in fields.items() if name not in _DESCRIPTION}
    encoding = _encoding_class(output_class)()
    # The output's own fields first and in its own order (``encoding[0]`` is the stock output's first field),
    # then the description.
    description = {"media": media, "scoring_seconds": scoring_seconds, "rows": len(output.pooler_output)}
    for name, value in {**fields, **description}.items():
        setattr(encoding, name, value)
    return encoding


_DESCRIPTION = ("media", "scoring_seconds", "rows")
"""The fields :class:`MediaEncoding` adds to the stock output."""


def encoded_media(encoding: Any, kind: str) -> Any:
    """The items of an encoding of ``kind`` ("image" or "video"); an error where it is not ours or no longer fits."""
    if not isinstance(encoding, MediaEncoding) or encoding.media is None:  # a copy of the class drops media
        raise ValueError(
            f"these {kind} encodings were not made by this model's get_{kind}_features while FlowCut was "
            "applied: pass the pixels instead (generate(prefill_chunk_size=...) also slices them into new "
            "encodings per chunk, which FlowCut's two-stage families do not support)"
        )
    media = encoding.media
    if len(encoding.pooler_output) != encoding.rows:
        raise ValueError(
            f"{len(encoding.pooler_output)} {kind} encodings for {encoding.rows} encoded: generate with "
            "num_beams > 1 or num_return_sequences > 1 repeats them, which FlowCut's two-stage families do not "
            "support yet"
        )
    return media


def encoding_scoring(encoding: Any) -> float | None:
    """The scoring time an encoding carries (None: not timed, not ours, or no encoding)."""
    return encoding.scoring_seconds if isinstance(encoding, MediaEncoding) else None


def total_scoring_seconds(*seconds: float | None) -> float | None:
    """The sum of the timed parts, or None where none was timed."""
    timed = [part for part in seconds if part is not None]
    return sum(timed) if timed else None


def stock_tuple(output: Any) -> Any:
    """An output object as the stock method's ``return_dict=False`` tuple (without FlowCut's description fields)."""
    if not isinstance(output, compat.EncoderOutput):
        return output
    return tuple(value for name, value in output.items() if name not in _DESCRIPTION)
