"""Accuracy of pruning methods and budgets on the shapes VQA data (``flowcut eval``).

Each question is answered by the model's first greedy token (the answers are one word), with the
pruning setting applied through :func:`flowcut.apply` exactly as a user would. The unpruned model
runs first; its accuracy is the reference every setting's retention is measured against.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowcut import compat
from flowcut.api import apply, check_applicable, get_handle
from flowcut.config import FlowCutConfig
from flowcut.core.language_stage import last_real_positions
from flowcut.core.scoring import entropy_ratio
from flowcut.data.shapes import GRID, QUESTION_KINDS, Sample, object_patches
from flowcut.families import family_of
from flowcut.tools.prompting import prompt_inputs

METHODS = {
    "flowcut": ("FlowCut", {"method": "flowcut"}),
    "one-shot": ("FlowCut one-shot (single layer)", {"method": "flowcut", "schedule": "one_shot"}),
    "uniform-counts": ("FlowCut, uniform counts", {"method": "flowcut", "counts": "uniform"}),
    "relation-only": ("FlowCut, CLS attention only", {"method": "flowcut", "criteria": "relation"}),
    "no-cumulative": ("FlowCut, no cumulative score", {"method": "flowcut", "ema_weight": 0.0}),
    "visionzip": ("VisionZip", {"method": "visionzip"}),
    "divprune": ("DivPrune", {"method": "divprune"}),
    "vispruner": ("VisPruner", {"method": "vispruner"}),
    "hiprune": ("HiPrune", {"method": "hiprune"}),
    "fastv": ("FastV", {"method": "fastv"}),
    "pool": ("pool", {"method": "pool"}),
    "random": ("random", {"method": "random"}),
}
"""Methods ``flowcut eval`` compares: name → (label, :class:`FlowCutConfig` fields); the paper's ablations included."""

DEFAULT_METHODS = ("flowcut", "one-shot", "visionzip", "fastv", "divprune", "pool", "random")
"""What ``flowcut eval`` compares unless told otherwise: FlowCut, its one-shot ablation, the baselines, the floors."""


@dataclass(frozen=True)
class Setting:
    """One row of the evaluation: a method at a budget, or the unpruned model (``method=None``)."""

    method: str | None
    keep: int | None = None

    @property
    def label(self) -> str:
        """Human-readable name."""
        return "unpruned" if self.method is None else METHODS[self.method][0]

    def config(self) -> FlowCutConfig:
        """The pruning configuration this setting applies."""
        if self.method is None or self.keep is None:
            raise ValueError("the unpruned setting has no pruning configuration")
        return FlowCutConfig(keep=self.keep, **METHODS[self.method][1])


def settings_for(methods: Sequence[str], budgets: Sequence[int]) -> list[Setting]:
    """The unpruned reference, then every method at every budget (largest budget first)."""
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(METHODS)}")
    if not budgets:
        raise ValueError("give at least one budget")
    for keep in budgets:
        FlowCutConfig(keep=keep)
    ordered = sorted(set(budgets), reverse=True)
    return [Setting(None)] + [Setting(method, keep) for method in methods for keep in ordered]


@dataclass
class Result:
    """Correct answers of one setting, overall and per question kind."""

    method: str | None
    keep: int
    label: str
    correct: int = 0
    total: int = 0
    per_kind: dict[str, list[int]] = field(default_factory=dict)
    """kind → [correct, total]."""
    recall_sum: float = 0.0
    recall_count: int = 0

    @property
    def object_recall(self) -> float | None:
        """Mean fraction of an image's object patches that survived pruning (None if not measured)."""
        return self.recall_sum / self.recall_count if self.recall_count else None

    @property
    def accuracy(self) -> float:
        """Fraction of questions answered correctly."""
        return self.correct / self.total if self.total else float("nan")


@dataclass
class EvalReport:
    """All results of one ``flowcut eval`` run."""

    model: str
    split: str
    start: int
    count: int
    num_patches: int
    results: list[Result]
    information_flow: dict[str, list[float]] | None = None
    """Per encoder layer of the unpruned model (see :func:`information_flow`)."""

    @property
    def unpruned(self) -> Result:
        """The reference row."""
        return next(result for result in self.results if result.method is None)

    def retention(self, result: Result) -> float | None:
        """Accuracy relative to the unpruned model (None when the unpruned model answers nothing right)."""
        reference = self.unpruned.accuracy
        return result.accuracy / reference if reference > 0 else None

    def find(self, method: str, keep: int) -> Result:
        """The result of ``method`` at ``keep``."""
        return next(result for result in self.results if result.method == method and result.keep == keep)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (accuracies and retentions included)."""
        rows = []
        for result in self.results:
            row = asdict(result)
            row["accuracy"] = result.accuracy
            row["retention"] = self.retention(result)
            row["object_recall"] = result.object_recall
            rows.append(row)
        return {
            "model": self.model,
            "split": self.split,
            "start": self.start,
            "count": self.count,
            "num_patches": self.num_patches,
            "results": rows,
            "information_flow": self.information_flow,
        }

    def to_markdown(self) -> str:
        """Accuracy (and retention of the unpruned accuracy) per method and budget, plus a per-kind table."""
        budgets = sorted({r.keep for r in self.results if r.method is not None}, reverse=True)
        methods = list(dict.fromkeys(r.method for r in self.results if r.method is not None))
        reference = self.unpruned
        header = "| method | " + " | ".join(f"keep {keep}" for keep in budgets) + " |"
        lines = [
            f"Shapes VQA, {self.split} split, {self.count} questions; unpruned ({self.num_patches} tokens): "
            f"**{100 * reference.accuracy:.1f} %**. Cells: accuracy (retention of the unpruned accuracy).",
            "",
            header,
            "|---|" + "---|" * len(budgets),
        ]
        for method in methods:
            cells = []
            for keep in budgets:
                result = self.find(method, keep)
                retention = self.retention(result)
                kept = "–" if retention is None else f"{100 * retention:.1f} %"
                cells.append(f"{100 * result.accuracy:.1f} % ({kept})")
            lines.append(f"| {METHODS[method][0]} | " + " | ".join(cells) + " |")
        if any(self.find(method, keep).object_recall is not None for method in methods for keep in budgets):
            lines += ["", "Object-patch recall: share of each image's object patches among the kept tokens (%):", ""]
            lines += [header, "|---|" + "---|" * len(budgets)]
            for method in methods:
                recalls = [self.find(method, keep).object_recall for keep in budgets]
                cells = ["–" if recall is None else f"{100 * recall:.1f}" for recall in recalls]
                lines.append(f"| {METHODS[method][0]} | " + " | ".join(cells) + " |")
        if self.information_flow:
            flow = self.information_flow
            layers = range(len(flow["entropy_ratio"]))
            lines += [
                "",
                "Information flow in the unpruned encoder, per layer: CLS attention entropy over patches (H / log N) "
                f"and CLS attention share on object patches (objects cover {100 * flow['object_area'][0]:.1f} % of "
                "patches):",
                "",
                "| layer | " + " | ".join(str(layer) for layer in layers) + " |",
                "|---|" + "---|" * len(layers),
                "| entropy ratio | " + " | ".join(f"{value:.2f}" for value in flow["entropy_ratio"]) + " |",
                "| object share | " + " | ".join(f"{value:.2f}" for value in flow["object_share"]) + " |",
            ]
        kinds = [kind for kind in QUESTION_KINDS if kind in reference.per_kind]
        lines += ["", "Accuracy per question kind (%):", "", "| setting | " + " | ".join(kinds) + " |"]
        lines.append("|---|" + "---|" * len(kinds))
        for result in self.results:
            name = result.label if result.method is None else f"{result.label}, keep {result.keep}"
            cells = [f"{100 * result.per_kind[k][0] / result.per_kind[k][1]:.1f}" for k in kinds]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> Path:
        """Accuracy vs tokens kept, one line per method, the unpruned accuracy as a reference line."""
        try:
            from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
        except ImportError as error:
            raise ImportError("plotting needs matplotlib: pip install 'flowcut-vlm[plot]'") from error
        figure = Figure(figsize=(6, 4), dpi=120)
        axes = figure.subplots()
        for method in dict.fromkeys(r.method for r in self.results if r.method is not None):
            rows = sorted((r for r in self.results if r.method == method), key=lambda r: r.keep)
            axes.plot([r.keep for r in rows], [100 * r.accuracy for r in rows], marker="o", label=METHODS[method][0])
        axes.axhline(100 * self.unpruned.accuracy, color="black", linestyle="--", label="unpruned")
        budgets = sorted({r.keep for r in self.results if r.method is not None})
        axes.set_xscale("log", base=2)
        axes.set_xticks(budgets, [str(keep) for keep in budgets])
        axes.set_xlabel(f"visual tokens kept (of {self.num_patches})")
        axes.set_ylabel("accuracy (%)")
        axes.set_title(f"Shapes VQA ({self.split}, {self.count} questions)")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path)
        return path

    def save(self, directory: Path, plot: bool = True) -> list[Path]:
        """Write ``eval.json``, ``eval.md`` and (with ``plot``) ``eval.png`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        json_path, markdown_path = directory / "eval.json", directory / "eval.md"
        json_path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        markdown_path.write_text(self.to_markdown())
        written = [json_path, markdown_path]
        if plot:
            written.append(self.plot(directory / "eval.png"))
        return written


def last_token_logits(
    logits: torch.Tensor, attention_mask: torch.Tensor, kept_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits at each row's last real token, for left or right padding: ``(B,T,V),(B,T) -> (B,V)``.

    After language-model pruning the logits cover only ``kept_positions`` ``(B, T')`` of the prompt.
    """
    last = last_real_positions(attention_mask)
    if kept_positions is not None:
        last = (kept_positions.to(last.device) <= last[:, None]).sum(1) - 1
    return logits[torch.arange(logits.shape[0]), last]


def first_answers(model: torch.nn.Module, processor: Any, batch: Sequence[Sample]) -> list[str]:
    """The model's first greedy token for each question, decoded."""
    images, questions = [sample.image for sample in batch], [sample.question for sample in batch]
    inputs = prompt_inputs(processor, images, questions, model.device, model.dtype)
    with torch.inference_mode():
        logits = model(**inputs).logits
    kept_positions = None
    if logits.shape[1] != inputs["attention_mask"].shape[1]:  # pruned inside the language model
        kept_positions = get_handle(model).last_trace.language_positions
    tokens = last_token_logits(logits, inputs["attention_mask"], kept_positions).argmax(-1)
    return [processor.tokenizer.decode([int(token)]).strip() for token in tokens]


def check_settings(model: torch.nn.Module, settings: Sequence[Setting]) -> None:
    """Refuse a setting this model cannot run (e.g. FastV on a two-layer language model) before any work."""
    check_applicable(model, [setting.config() for setting in settings if setting.method])


def evaluate(
    model: torch.nn.Module,
    processor: Any,
    questions: Sequence[Sample],
    settings: Sequence[Setting],
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> list[Result]:
    """Answer every question under every setting; ``on_batch(n)`` is called after each batch of ``n``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    num_patches = grid * grid
    check_settings(model, settings)
    results = []
    for setting in settings:
        result = Result(setting.method, setting.keep or num_patches, setting.label)
        # Each pruned setting adapts its own processor copy; the caller's stays untouched.
        pruned_processor = copy.deepcopy(processor) if setting.method else processor
        handle = apply(model, processor=pruned_processor, config=setting.config()) if setting.method else None
        try:
            for start in range(0, len(questions), batch_size):
                batch = questions[start : start + batch_size]
                answers = first_answers(model, pruned_processor, batch)
                for sample, answer in zip(batch, answers, strict=True):
                    tally = result.per_kind.setdefault(sample.kind, [0, 0])
                    hit = int(answer == sample.answer)
                    tally[0] += hit
                    tally[1] += 1
                    result.correct += hit
                    result.total += 1
                if handle is not None and grid == GRID:
                    for sample, kept in zip(batch, handle.last_trace.kept_indices, strict=True):
                        objects = object_patches(sample.objects)
                        result.recall_sum += len(objects.intersection(kept.tolist())) / len(objects)
                        result.recall_count += 1
                if on_batch is not None:
                    on_batch(len(batch))
        finally:
            if handle is not None:
                handle.remove()
        results.append(result)
    return results


def information_flow(model: torch.nn.Module, processor: Any, questions: Sequence[Sample]) -> dict[str, list[float]]:
    """How the unpruned encoder's CLS attention evolves with depth on shapes images (24×24 grid only).

    Per layer, averaged over images: the entropy of CLS's head-averaged attention over the patches
    divided by log N (1 = uniform), and the share of that attention on the objects' patches. FlowCut
    relies on attention concentrating with depth; these numbers show whether a model does.
    """
    family = family_of(model)
    tower_name = getattr(family, "image_tower_name", None)  # the families with one CLIP image tower declare it
    if tower_name is None:
        raise ValueError(f"information flow reads a CLIP image tower; {type(model).__name__} has none")
    tower = copy.deepcopy(getattr(model.model, tower_name)).float().eval()
    compat.set_attention_implementation(tower.config, "eager")  # the copy only: attention probabilities are needed
    pixel_values = processor.image_processor([sample.image for sample in questions], return_tensors="pt").pixel_values
    with torch.inference_mode():
        attentions = tower(pixel_values.to(model.device), output_attentions=True).attentions
    masks = torch.zeros(len(questions), GRID * GRID, dtype=torch.bool)
    for row, sample in enumerate(questions):
        masks[row, sorted(object_patches(sample.objects))] = True
    entropy, share = [], []
    for attention in attentions:
        to_patches = attention[:, :, 0, 1:].mean(1).float().cpu()
        probabilities = to_patches / to_patches.sum(-1, keepdim=True)
        entropy.append(float(entropy_ratio(to_patches).mean()))
        share.append(float((probabilities * masks).sum(-1).mean()))
    return {"entropy_ratio": entropy, "object_share": share, "object_area": [float(masks.float().mean())]}
