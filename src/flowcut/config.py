"""The pruning configuration: a small dataclass, validated on creation, saved as JSON."""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

METHODS = ("flowcut", "random")
"""Methods available through :func:`flowcut.apply`: FlowCut, and a seeded uniform sample of patches (the floor)."""

SCHEDULES = ("progressive", "one_shot")
"""FlowCut's pruning schedule: SPEC §2's progressive pruning, or the paper's single-layer one-shot ablation."""

CONFIG_NAME = "flowcut_config.json"


def validate_keep(keep: Any) -> int:
    """Return ``keep`` if it is a positive integer token count, else raise a clear error."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral):
        raise TypeError(
            f"keep must be a positive integer number of visual tokens per image, got {keep!r} ({type(keep).__name__})"
        )
    if keep < 1:
        raise ValueError(f"keep must be at least 1 visual token per image, got {keep}")
    return int(keep)


@dataclass(frozen=True)
class FlowCutConfig:
    """Settings of one pruned model instance.

    ``keep`` is the number of visual tokens per image that reach the language model. The other
    fields reproduce the paper's defaults; change them only to study the method.
    """

    keep: int = 64
    method: str = "flowcut"
    prune_interval: int = 2
    """Prune every this many layers, counted back from the final prune (SPEC §2: 2)."""
    ema_weight: float = 0.5
    """Weight of the previous cumulative score: ``C = w·C + (1 − w)·S`` (SPEC §2: 0.5)."""
    record_scores: bool = False
    """Keep every layer's criteria maps in the trace (for visualisation; costs a copy per layer)."""
    schedule: str = "progressive"
    """``"one_shot"``: score one layer (the last before the features) and prune to ``keep`` there (ablation)."""
    seed: int = 0
    """Seed of ``method="random"``; each image's sample also depends on its pixels, not on its batch."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", validate_keep(self.keep))
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; available: {', '.join(METHODS)}")
        if isinstance(self.prune_interval, bool) or not isinstance(self.prune_interval, int) or self.prune_interval < 1:
            raise ValueError(f"prune_interval must be a positive integer, got {self.prune_interval!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; available: {', '.join(SCHEDULES)}")
        if self.schedule != "progressive" and self.method != "flowcut":
            raise ValueError(f"schedule={self.schedule!r} is a FlowCut ablation; it does not apply to {self.method!r}")
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
