"""Train the bundled reference model on the shapes VQA data, in two stages, like LLaVA-1.5.

Stage 1 (vision pre-training): the CLIP-style encoder learns through its CLS token: a linear
head on the pooled CLS output predicts which (colour, shape) pairs the image holds and how many
objects there are, so the encoder has to route object information to CLS through attention,
which is the information flow FlowCut reads. An optional auxiliary per-patch head on the feature
layer (``dense_weight`` > 0, off for the bundled model) names the object under each patch, to
teach the small encoder local semantics faster than CLS supervision alone does.

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

from flowcut.data.shapes import (
    COLOURS,
    COUNT_WORDS,
    IMAGE_SIZE,
    PATCH_SIZE,
    SHAPES,
    make_conversation,
    make_sample,
    patch_labels,
)
from flowcut.tiny import build_tiny_llava

PAIRS = [(colour, shape) for colour in COLOURS for shape in SHAPES]
"""Stage-1 presence targets: one logit per (colour, shape) pair."""


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
    stage1_steps: int = 800
    stage1_batch: int = 32
    stage1_lr: float = 1e-3
    stage2_steps: int = 700
    stage2_batch: int = 32
    stage2_lr: float = 1e-3
    turns: int = 6
    """Questions per training conversation."""
    dense_weight: float = 0.0
    """Weight of an auxiliary stage-1 per-patch object loss; 0 (the bundled model) trains through CLS alone."""
    warmup_steps: int = 100
    weight_decay: float = 0.05
    threads: int = 2

    def model_options(self) -> dict[str, int]:
        """Keyword arguments of :func:`flowcut.tiny.build_tiny_llava` for this architecture."""
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
    return model.train(), processor


def _learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


# Batch builders run in a worker process; they are pure functions of their arguments.


def _stage1_batch(processor: LlavaProcessor, start: int, size: int, *, dense: bool) -> dict[str, np.ndarray]:
    batch = [make_sample("train", index) for index in range(start, start + size)]
    pixels = processor.image_processor([sample.image for sample in batch], return_tensors="np")["pixel_values"]
    presence = np.zeros((size, len(PAIRS)), dtype=np.float32)
    for row, sample in enumerate(batch):
        for obj in sample.objects:
            presence[row, PAIRS.index((obj.colour, obj.shape))] = 1.0
    count = np.array([len(sample.objects) for sample in batch], dtype=np.int64)
    batch_arrays = {"pixel_values": pixels, "presence": presence, "count": count}
    if dense:
        # Per patch: 0 for background, else 1 + the (colour, shape) pair of the object covering it.
        pair_of_object = [np.array([0] + [1 + PAIRS.index((o.colour, o.shape)) for o in s.objects]) for s in batch]
        patches = np.stack([pairs[patch_labels(s.objects)] for pairs, s in zip(pair_of_object, batch, strict=True)])
        batch_arrays["patch_pairs"] = patches
    return batch_arrays


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


def train_vision(model: LlavaForConditionalGeneration, processor: LlavaProcessor, recipe: Recipe, log: list) -> None:
    """Stage 1: CLS attribute prediction trains ``model.model.vision_tower`` in place."""
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(PAIRS) + len(COUNT_WORDS))
    parameters = [*tower.parameters(), *head.parameters()]
    if recipe.dense_weight:
        patch_head = torch.nn.Linear(tower.config.hidden_size, 1 + len(PAIRS))
        parameters += list(patch_head.parameters())
    # Object patches are ~5 % of the grid; weigh them up so the background class does not dominate.
    patch_class_weight = torch.tensor([0.2] + [1.0] * len(PAIRS))
    optimizer = _optimizer(parameters, recipe, recipe.stage1_lr)
    started = time.time()
    build = partial(_stage1_batch, processor, dense=bool(recipe.dense_weight))
    for step, batch in enumerate(_batches(build, recipe.stage1_steps, recipe.stage1_batch)):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, recipe.stage1_steps, recipe.stage1_lr, recipe.warmup_steps)
        output = tower(pixel_values=batch["pixel_values"], output_hidden_states=bool(recipe.dense_weight))
        logits = head(output.pooler_output)
        presence_logits, count_logits = logits[:, : len(PAIRS)], logits[:, len(PAIRS) :]
        # Scaled so a missed object weighs about as much as a wrong count (≈ 2.5 objects per image).
        presence_loss = torch.nn.functional.binary_cross_entropy_with_logits(presence_logits, batch["presence"])
        loss = presence_loss * len(PAIRS) / 4 + torch.nn.functional.cross_entropy(count_logits, batch["count"])
        if recipe.dense_weight:
            patch_logits = patch_head(output.hidden_states[model.config.vision_feature_layer][:, 1:])
            patch_loss = torch.nn.functional.cross_entropy(
                patch_logits.flatten(0, 1), batch["patch_pairs"].flatten(), weight=patch_class_weight
            )
            loss = loss + recipe.dense_weight * patch_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0 or step + 1 == recipe.stage1_steps:
            metrics = {}
            with torch.no_grad():
                pair_accuracy = ((presence_logits > 0) == (batch["presence"] > 0)).float().mean().item()
                count_accuracy = (count_logits.argmax(-1) == batch["count"]).float().mean().item()
                if recipe.dense_weight:
                    on_objects = batch["patch_pairs"] > 0
                    hits = patch_logits.argmax(-1)[on_objects] == batch["patch_pairs"][on_objects]
                    metrics["object_patch_accuracy"] = round(hits.float().mean().item(), 4)
            entry = {
                "stage": 1,
                "step": step + 1,
                "seconds": round(time.time() - started, 1),
                "loss": round(loss.item(), 4),
                "pair_accuracy": round(pair_accuracy, 4),
                "count_accuracy": round(count_accuracy, 4),
                **metrics,
            }
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
    model.config.vision_config._attn_implementation = "sdpa"
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="directory for the trained model")
    parser.add_argument("--stage", type=int, choices=(1, 2), action="append", help="run only this stage")
    defaults = Recipe()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    arguments = vars(parser.parse_args(argv))
    output, stages = arguments.pop("output"), tuple(arguments.pop("stage") or (1, 2))
    train(output, Recipe(**arguments), stages)


if __name__ == "__main__":
    main()
