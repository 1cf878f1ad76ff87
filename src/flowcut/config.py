"""The pruning configuration: a small dataclass, validated on creation, saved as JSON."""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from flowcut.methods import get_method, method_names, stages

METHODS = method_names()
"""Methods available through :func:`flowcut.apply` (see :mod:`flowcut.methods`)."""

SCHEDULES = ("progressive", "one_shot")
"""FlowCut's pruning schedule: SPEC §2's progressive pruning, or the paper's single-layer one-shot ablation."""

COUNTS = ("adaptive", "uniform")
"""How many patches a FlowCut prune step removes: SPEC §2's entropy-adaptive count, or equal steps (ablation)."""

CRITERIA = ("all", "relation")
"""FlowCut's patch score: SPEC §2's three criteria, or CLS attention alone (ablation: multi-criteria off)."""

STAGE_MODES = ("auto", "encoder")
"""Where a method prunes on two-stage families: its own split (FlowCut: 2T in the encoder, T after decoder
layer 1, SPEC §4), or the encoder stage alone delivering T (each crop, frame or slice its share, SPEC §8)."""

_METHOD_ONLY = {
    "schedule": ("progressive", "FlowCut"),
    "counts": ("adaptive", "FlowCut"),
    "criteria": ("all", "FlowCut"),
    "prune_interval": (2, "FlowCut"),
    "ema_weight": (0.5, "FlowCut"),
    "time_scoring": (False, "FlowCut"),
    "important_ratio": (0.5, "VisPruner"),
    "anchor_share": (0.1, "HiPrune"),
    "object_layer": (None, "HiPrune"),
}
"""Settings only some methods read: name -> (default, whose setting); other methods refuse a changed value."""

CONFIG_NAME = "flowcut_config.json"


def validate_keep(keep: Any) -> int | float:
    """Return ``keep`` if it is a positive integer token count or a ratio in (0, 1), else raise a clear error."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(
            "keep must be a positive integer number of visual tokens per image or a ratio in (0, 1), "
            f"got {keep!r} ({type(keep).__name__})"
        )
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep must be at least 1 visual token per image, got {keep}")
        return int(keep)
    if not 0.0 < keep < 1.0:
        raise ValueError(
            f"a fractional keep is the share of each image's visual tokens and must be in (0, 1), got {keep}"
        )
    return float(keep)


def tokens_to_keep(keep: int | float, available: int) -> int:
    """The budget of one image with ``available`` visual tokens: ``keep`` itself (at most all of them),
    or for a ratio ``round(keep · available)`` (half to even), at least 1."""
    if isinstance(keep, float):
        return max(1, round(keep * available))
    return min(keep, available)


def frame_budgets(
    keep: int, frames: int, per_frame: int, parts: str = "frames", requested: int | float | None = None
) -> list[int]:
    """Split a video's budget of ``keep`` tokens over ``frames`` frames of ``per_frame`` tokens each.

    Every frame gets ``keep // frames``; the remainder goes one token each to the first frames (so
    ``keep=260`` over 8 frames gives 33, 33, 33, 33, 32, 32, 32, 32), and no frame gets more than it
    has. A budget below one token per frame is refused: every frame keeps at least one token.
    ``parts`` names the frames in that message (Qwen2-VL splits a video by temporal patch);
    ``requested`` is the configured ``keep`` where ``keep`` was computed from a ratio.
    """
    if keep < frames:
        if requested is not None and requested != keep:
            raise ValueError(f"keep={requested} gives the video {keep} tokens, fewer than its {frames} {parts}")
        raise ValueError(f"keep={keep} is less than one token for each of the video's {frames} {parts}")
    base, remainder = divmod(keep, frames)
    return [min(per_frame, base + (frame < remainder)) for frame in range(frames)]


def unit_shares(keep: int, sizes: list[int]) -> list[int]:
    """Split one image's budget of ``keep`` units over its rows (crops) in proportion to their ``sizes``.

    SPEC §8's rule, a function of the sizes alone: row ``i`` gets ``keep · sizes[i] // sum(sizes)``
    and the remainder goes one unit each to the first rows with room (``keep=64`` over sizes 144, 144,
    72 gives 26, 26, 12). A budget at or above the total keeps every unit.
    """
    total = sum(sizes)
    if keep >= total:
        return list(sizes)
    shares = [keep * size // total for size in sizes]
    remainder = keep - sum(shares)
    for row, size in enumerate(sizes):
        if remainder and shares[row] < size:
            shares[row] += 1
            remainder -= 1
    return shares


@dataclass(frozen=True)
class FlowCutConfig:
    """Settings of one pruned model instance.

    ``keep`` is the number of visual tokens per image that reach the language model, or a ratio in
    (0, 1) of each image's visual tokens (useful where the token count varies with resolution, as in
    Qwen2-VL). The other fields reproduce the paper's defaults; change them only to study the method.
    """

    keep: int | float = 64
    method: str = "flowcut"
    prune_interval: int = 2
    """Prune every this many layers, counted back from the final prune (SPEC §2: 2)."""
    ema_weight: float = 0.5
    """Weight of the previous cumulative score: ``C = w·C + (1 − w)·S`` (SPEC §2: 0.5).

    0 turns the cumulative score off (each layer prunes by its own score; ablation)."""
    record_scores: bool = False
    """Keep every layer's criteria maps in the trace (for visualisation; costs a copy per layer)."""
    time_scoring: bool = False
    """Measure FlowCut's scoring and selection time into ``trace.scoring_ms`` (``flowcut bench`` uses it)."""
    schedule: str = "progressive"
    """``"one_shot"``: score one layer (the last before the features) and prune to ``keep`` there (ablation)."""
    seed: int = 0
    """Seed of ``method="random"``; each image's sample also depends on its pixels, not on its batch."""
    counts: str = "adaptive"
    """``"uniform"``: equal prune steps instead of entropy-adaptive counts (ablation)."""
    criteria: str = "all"
    """``"relation"``: score patches by CLS attention alone (ablation: multi-criteria off)."""
    important_ratio: float = 0.5
    """``method="vispruner"``: the share of ``keep`` chosen by attention; the rest are diverse tokens (paper: 0.5)."""
    anchor_share: float = 0.1
    """``method="hiprune"``: α, the share of ``keep`` for anchors and their neighbours (paper: 0.1)."""
    object_layer: int | None = None
    """``method="hiprune"``: the 1-based encoder layer whose attention picks the anchors; None: the paper's 9 of
    CLIP's 24 layers scaled to the tower's depth (``round(9/24 · layers)``)."""
    stages: str = "auto"
    """``"encoder"``: on two-stage families (LLaVA-NeXT, OneVision, Qwen-VL) the encoder stage prunes straight
    to ``keep`` and no decoder layer prunes, so each image's token count is fixed by its size and ``keep``
    alone (what a server that fixes token counts at admission needs). ``"auto"``: the method's own split.
    Single-stage families prune in the encoder either way."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", validate_keep(self.keep))
        method = get_method(self.method)  # unknown names are an error listing the known ones
        if isinstance(self.prune_interval, bool) or not isinstance(self.prune_interval, int) or self.prune_interval < 1:
            raise ValueError(f"prune_interval must be a positive integer, got {self.prune_interval!r}")
        for name, choices in (
            ("schedule", SCHEDULES),
            ("counts", COUNTS),
            ("criteria", CRITERIA),
            ("stages", STAGE_MODES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; available: {', '.join(choices)}")
        for name, (default, owner) in _METHOD_ONLY.items():
            if name not in method.settings and getattr(self, name) != default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is a {owner} setting; it does not apply to {self.method!r}"
                )
        for name in ("important_ratio", "anchor_share"):
            ratio = getattr(self, name)
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {ratio!r}")
        layer = self.object_layer
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 1):
            raise ValueError(f"object_layer must be a positive (1-based) layer number, got {layer!r}")
        stages(method, self.stages)  # a method that prunes only in the language model has no encoder-only mode
        if not 0.0 <= self.ema_weight < 1.0:
            raise ValueError(f"ema_weight must be in [0, 1), got {self.ema_weight!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowCutConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FlowCut config keys: {', '.join(unknown)}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        """Write ``flowcut_config.json`` into ``directory`` (e.g. next to a saved model)."""
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> FlowCutConfig:
        """Read ``flowcut_config.json`` from ``directory``."""
        return cls.from_dict(json.loads((Path(directory) / CONFIG_NAME).read_text()))
