"""Train the bundled reference model on the shapes VQA data, in two stages, like LLaVA-1.5.

Stage 1 (vision pre-training): the CLIP-style encoder learns through its CLS token only: a
linear head on the pooled CLS output describes the scene (which (colour, shape) pairs, colours and
shapes it holds, how many objects, and where and how big each present pair is), so the encoder
has to route object information to CLS through attention, which is the information flow FlowCut
reads. Stage 1a runs on small scenes at low resolution (cheap steps, where local shape features
are learned), stage 1b on full-size scenes.

Stage 2 (visual instruction tuning): the encoder is frozen; the projector and a small Llama learn
to answer multi-turn conversations about each image, with the loss on the answers only. The
language model reads the feature layer's patch tokens (layer −2, CLS dropped), as LLaVA-1.5 does.

Run ``python -m flowcut.reference.train --output DIR``; the same arguments give the same weights
(fixed seeds, data as a pure function of the sample index, fixed thread count).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from flowcut import compat
from flowcut.data.shapes import (
    COLOURS,
    COUNT_WORDS,
    IMAGE_SIZE,
    PATCH_SIZE,
    SHAPES,
    SIZES,
    ShapeObject,
    make_conversation,
    make_scene,
)
from flowcut.testing import build_tiny_llava

PAIRS = [(colour, shape) for colour in COLOURS for shape in SHAPES]
"""Stage-1 targets are per (colour, shape) pair: present?, where, small or large."""
COLOUR_NAMES, SIZE_NAMES = list(COLOURS), list(SIZES)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights."""

    seed: int = 0
    vision_layers: int = 8
    vision_hidden: int = 96
    vision_heads: int = 4
    vision_intermediate: int = 256
    text_layers: int = 3
    text_hidden: int = 128
    text_heads: int = 4
    text_intermediate: int = 384
    pretrain_steps: int = 3000
    """Stage 1a: steps on small scenes (low resolution, interpolated position embeddings)."""
    pretrain_size: int = 112
    pretrain_objects: int = 1
    middle_steps: int = 0
    """Stage 1m (between 1a and 1b; 0 skips it): steps on mid-size scenes with up to 4 objects, which cost
    about half as much as full-size ones, so the encoder meets crowded scenes for longer."""
    middle_size: int = 224
    stage1_steps: int = 300
    """Stage 1b: steps on full-size scenes."""
    stage1_batch: int = 32
    stage1_lr: float = 1e-3
    stage2_steps: int = 700
    stage2_batch: int = 32
    stage2_lr: float = 1e-3
    turns: int = 8
    """Questions per training conversation."""
    warmup_steps: int = 100
    weight_decay: float = 0.05
    threads: int = 2
    position_init: str = "random"
    """Patch position embeddings at the start: ``"random"`` (CLIP's init; the bundled model) or ``"sincos"``
    (a 2-D sine-cosine table times ``position_scale``, which lets CLS learn where objects are)."""
    position_scale: float = 0.5
    location_weight: float = 5.0
    """Weight of the stage-1 location loss (mean squared error of the present pairs' centres, as image fractions)."""
    stage2_bf16: bool = False
    """Run stage 2's forward passes under bfloat16 autocast (weights and optimiser stay float32). Faster on CPUs
    with AMX (on 2 cores: 1.95 against 2.25 s per step, the batch-building worker included); slower on CPUs
    without bfloat16 units, and the weights differ from a float32 run."""

    def model_options(self) -> dict[str, int]:
        """Keyword arguments of :func:`flowcut.testing.build_tiny_llava` for this architecture."""
        return {
            "vision_layers": self.vision_layers,
            "vision_hidden": self.vision_hidden,
            "vision_heads": self.vision_heads,
            "vision_intermediate": self.vision_intermediate,
            "text_layers": self.text_layers,
            "text_hidden": self.text_hidden,
            "text_heads": self.text_heads,
            "text_intermediate": self.text_intermediate,
            "text_kv_heads": self.text_heads,
        }


def build_untrained(recipe: Recipe) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The reference architecture with fresh weights (seeded by the recipe)."""
    model, processor = build_tiny_llava(
        seed=recipe.seed, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **recipe.model_options()
    )
    if recipe.position_init not in ("random", "sincos"):
        raise ValueError(f"unknown position_init {recipe.position_init!r}; available: random, sincos")
    if recipe.position_init == "sincos":
        tower = model.model.vision_tower
        embedding = next(m for m in tower.modules() if isinstance(m, compat.CLIPVisionEmbeddings)).position_embedding
        table = sincos_positions(IMAGE_SIZE // PATCH_SIZE, embedding.embedding_dim) * recipe.position_scale
        with torch.no_grad():
            embedding.weight[1:] = table  # row 0 is CLS
    return model.train(), processor


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """A 2-D sine-cosine table ``(grid², dim)``, row-major: quarters sin(x·f), cos(x·f), sin(y·f), cos(y·f).

    Frequencies ``f_i = 100^(−i/(dim/4))``; ``dim`` must be a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"the sine-cosine table needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    frequencies = 100.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, columns = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    x = columns.flatten()[:, None].double() * frequencies
    y = rows.flatten()[:, None].double() * frequencies
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


def _learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


# Batch builders run in a worker process; they are pure functions of their arguments.


def scene_targets(objects: tuple[ShapeObject, ...], image_size: int) -> dict[str, np.ndarray]:
    """What the CLS token must tell about a scene: which pairs, colours and shapes, how many, where, how big."""
    presence = np.zeros(len(PAIRS), dtype=np.float32)
    colours = np.zeros(len(COLOUR_NAMES), dtype=np.float32)
    shapes = np.zeros(len(SHAPES), dtype=np.float32)
    places = np.zeros((len(PAIRS), 3), dtype=np.float32)  # x, y as fractions of the image; 1 if large
    for obj in objects:
        pair = PAIRS.index((obj.colour, obj.shape))
        presence[pair] = colours[COLOUR_NAMES.index(obj.colour)] = shapes[SHAPES.index(obj.shape)] = 1.0
        places[pair] = (obj.x / image_size, obj.y / image_size, SIZE_NAMES.index(obj.size))
    count = np.array(len(objects), dtype=np.int64)
    return {"presence": presence, "colours": colours, "shapes": shapes, "count": count, "places": places}


def _stage1_batch(processor: LlavaProcessor, start: int, size: int, *, image_size: int, max_objects: int) -> dict:
    scenes = [make_scene("train", index, image_size, max_objects) for index in range(start, start + size)]
    pixels = processor.image_processor(
        [image for image, _ in scenes],
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        return_tensors="np",
    )["pixel_values"]
    targets = [scene_targets(objects, image_size) for _, objects in scenes]
    return {"pixel_values": pixels} | {key: np.stack([t[key] for t in targets]) for key in targets[0]}


def conversation_text(turns: tuple[tuple[str, str, str], ...]) -> str:
    """LLaVA-1.5's conversation format: the image in the first user turn, ``</s>`` after each answer."""
    parts = [
        f"USER: {'<image>' + chr(10) if turn == 0 else ''}{question} ASSISTANT: {answer}</s>"
        for turn, (question, answer, _) in enumerate(turns)
    ]
    return "".join(parts)


def answer_labels(input_ids: np.ndarray, assistant_id: int, colon_id: int) -> np.ndarray:
    """Labels that train the answer word and the ``</s>`` after every ``ASSISTANT:``; -100 elsewhere."""
    labels = np.full_like(input_ids, -100)
    for row, position in zip(*np.nonzero(input_ids[:, :-1] == assistant_id), strict=True):
        if input_ids[row, position + 1] == colon_id:
            labels[row, position + 2 : position + 4] = input_ids[row, position + 2 : position + 4]
    return labels


def _stage2_batch(processor: LlavaProcessor, start: int, size: int, *, turns: int) -> dict[str, np.ndarray]:
    conversations = [make_conversation("train", index, turns) for index in range(start, start + size)]
    texts = [conversation_text(conversation.turns) for conversation in conversations]
    tokenizer = processor.tokenizer
    inputs = processor(
        text=texts,
        images=[conversation.image for conversation in conversations],
        padding=True,
        return_tensors="np",
    )
    assistant_id, colon_id = tokenizer.convert_tokens_to_ids(["ASSISTANT", ":"])
    inputs = dict(inputs)
    inputs["labels"] = answer_labels(inputs["input_ids"], assistant_id, colon_id)
    return inputs


def _batches(build: Callable[[int, int], dict[str, np.ndarray]], steps: int, size: int) -> Iterator[dict]:
    """Batches ``0..steps-1`` (sample indices ``step·size …``), each built in a worker while the last trains."""
    with ProcessPoolExecutor(1) as pool:
        pending = pool.submit(build, 0, size)
        for step in range(steps):
            batch = pending.result()
            if step + 1 < steps:
                pending = pool.submit(build, (step + 1) * size, size)
            yield {key: torch.from_numpy(value) for key, value in batch.items()}


def _optimizer(parameters: list[torch.nn.Parameter], recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))


class SceneHead(torch.nn.Module):
    """Stage-1 head on the pooled CLS output: presence, colour, shape and count logits, and per-pair places."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.sizes = (len(PAIRS), len(COLOUR_NAMES), len(SHAPES), len(COUNT_WORDS), 3 * len(PAIRS))
        self.linear = torch.nn.Linear(hidden_size, sum(self.sizes))

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        presence, colours, shapes, count, places = self.linear(pooled).split(self.sizes, dim=-1)
        places = places.unflatten(-1, (len(PAIRS), 3))
        return {"presence": presence, "colours": colours, "shapes": shapes, "count": count, "places": places}


def scene_loss(
    predicted: dict[str, torch.Tensor], target: dict[str, torch.Tensor], location_weight: float = 5.0
) -> torch.Tensor:
    """Presence losses (pairs, colours, shapes), count, and the places of the present pairs.

    Shape is the attribute a small ViT learns last, so shapes weigh as much as colours.
    """
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    present = target["presence"].bool()
    location = torch.nn.functional.mse_loss(predicted["places"][..., :2][present], target["places"][..., :2][present])
    size = bce(predicted["places"][..., 2][present], target["places"][..., 2][present])
    return (
        bce(predicted["presence"], target["presence"]) * len(PAIRS) / 4
        + bce(predicted["colours"], target["colours"]) * len(COLOUR_NAMES)
        + bce(predicted["shapes"], target["shapes"]) * len(COLOUR_NAMES)
        + torch.nn.functional.cross_entropy(predicted["count"], target["count"])
        + location_weight * location
        + size
    )


def _scene_metrics(predicted: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, float]:
    """Exact-set accuracies (all labels right) and the mean location error in patches of a 24-wide grid."""
    present = target["presence"].bool()

    def exact(key: str) -> float:
        return ((predicted[key] > 0) == target[key].bool()).all(-1).float().mean().item()

    error = (predicted["places"][..., :2][present] - target["places"][..., :2][present]).abs().mean().item()
    return {
        "pairs": round(exact("presence"), 4),
        "colours": round(exact("colours"), 4),
        "shapes": round(exact("shapes"), 4),
        "count": round((predicted["count"].argmax(-1) == target["count"]).float().mean().item(), 4),
        "location_error_patches": round(error * IMAGE_SIZE / PATCH_SIZE, 2),
    }


def train_vision(model: LlavaForConditionalGeneration, processor: LlavaProcessor, recipe: Recipe, log: list) -> None:
    """Stage 1: the encoder (``model.model.vision_tower``) learns through its CLS token, in place.

    First on small scenes at ``pretrain_size`` pixels (position embeddings interpolated, as CLIP
    is pre-trained at a lower resolution than LLaVA-1.5 uses), which is where local shape features
    are learned cheaply, then on full-size scenes.
    """
    tower = model.model.vision_tower
    head = SceneHead(tower.config.hidden_size)
    parameters = [*tower.parameters(), *head.parameters()]
    phases = [
        ("1a", recipe.pretrain_steps, recipe.pretrain_size, recipe.pretrain_objects),
        ("1m", recipe.middle_steps, recipe.middle_size, 4),
        ("1b", recipe.stage1_steps, IMAGE_SIZE, 4),
    ]
    for phase, steps, image_size, max_objects in phases:
        if steps == 0:
            continue
        optimizer = _optimizer(parameters, recipe, recipe.stage1_lr)
        started = time.time()
        build = partial(_stage1_batch, processor, image_size=image_size, max_objects=max_objects)
        for step, batch in enumerate(_batches(build, steps, recipe.stage1_batch)):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps, recipe.stage1_lr, min(recipe.warmup_steps, steps // 4))
            pooled = tower(pixel_values=batch.pop("pixel_values"), interpolate_pos_encoding=True).pooler_output
            predicted = head(pooled)
            loss = scene_loss(predicted, batch, recipe.location_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % 50 == 0 or step + 1 == steps:
                with torch.no_grad():
                    metrics = _scene_metrics(predicted, batch)
                entry = {"stage": phase, "step": step + 1, "seconds": round(time.time() - started, 1)}
                entry |= {"loss": round(loss.item(), 4), **metrics}
                log.append(entry)
                print(json.dumps(entry), flush=True)


def train_language(model: LlavaForConditionalGeneration, processor: LlavaProcessor, recipe: Recipe, log: list) -> None:
    """Stage 2: projector and language model learn to answer; the vision tower stays frozen."""
    model.model.vision_tower.requires_grad_(False)
    model.model.vision_tower.eval()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(parameters, recipe, recipe.stage2_lr)
    started = time.time()
    batches = _batches(partial(_stage2_batch, processor, turns=recipe.turns), recipe.stage2_steps, recipe.stage2_batch)
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, recipe.stage2_steps, recipe.stage2_lr, recipe.warmup_steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.stage2_bf16):
            output = model(**batch)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0 or step + 1 == recipe.stage2_steps:
            with torch.no_grad():
                labels = batch["labels"][:, 1:]
                predicted = output.logits[:, :-1].argmax(-1)
                # Answer words only: the label before each one is ":" (the </s> labels follow words).
                answers = labels != -100
                answers[:, 1:] &= labels[:, :-1] == -100
                accuracy = (predicted[answers] == labels[answers]).float().mean().item()
            entry = {
                "stage": 2,
                "step": step + 1,
                "seconds": round(time.time() - started, 1),
                "loss": round(output.loss.item(), 4),
                "answer_accuracy": round(accuracy, 4),
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.requires_grad_(True)


def train(output: Path, recipe: Recipe, stages: tuple[int, ...] = (1, 2)) -> Path:
    """Train (both stages, or one, resuming from ``output/vision_stage1.safetensors``) and save the model."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    output.mkdir(parents=True, exist_ok=True)
    model, processor = build_untrained(recipe)
    compat.set_attention_implementation(model.config.vision_config, "sdpa")
    log: list[dict] = []
    checkpoint = output / "vision_stage1.safetensors"
    if 1 in stages:
        train_vision(model, processor, recipe, log)
        save_file(model.model.vision_tower.state_dict(), checkpoint)
    else:
        model.model.vision_tower.load_state_dict(load_file(checkpoint))
    if 2 in stages:
        torch.manual_seed(recipe.seed + 1)
        train_language(model, processor, recipe, log)
        model.eval()
        model.save_pretrained(output)
        processor.save_pretrained(output)
        checkpoint.unlink(missing_ok=True)
    history = output / "training_log.json"
    previous = json.loads(history.read_text())["log"] if history.exists() and 1 not in stages else []
    history.write_text(json.dumps({"recipe": asdict(recipe), "log": previous + log}, indent=1) + "\n")
    return output


def _parse_flag(text: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``) for boolean recipe fields."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="directory for the trained model")
    parser.add_argument("--stage", type=int, choices=(1, 2), action="append", help="run only this stage")
    defaults = Recipe()
    for name, value in asdict(defaults).items():
        kind = _parse_flag if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    arguments = vars(parser.parse_args(argv))
    output, stages = arguments.pop("output"), tuple(arguments.pop("stage") or (1, 2))
    train(output, Recipe(**arguments), stages)


if __name__ == "__main__":
    main()
