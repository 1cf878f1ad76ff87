"""A procedural visual-question dataset whose answers live in a few patches (seeded, deterministic).

Images are 336×336 (a 24×24 grid of 14-px patches, as LLaVA-1.5), with 1–4 small coloured shapes
on a cluttered, colourless background. Questions need the objects' patches: the colour of a named
shape, the shape of a named colour, existence, counting, size and relative position. Every
sample is a pure function of ``(split, index)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 12, "large": 20}  # radius in pixels: about 2×2 and 3×3 patches
COUNT_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_KINDS = ("colour", "shape", "exists", "count", "size", "left", "above")
SPLIT_SEEDS = {"train": 1_000, "validation": 2_000, "test": 3_000}

VOCABULARY = sorted(
    set(COLOURS)
    | set(SHAPES)
    | set(SIZES)
    | set(COUNT_WORDS)
    | {"yes", "no", "what", "colour", "is", "the", "shape", "of", "object", "there", "a", "how", "many"}
    | {"objects", "are", "or", "left", "above", "?"}
)
"""Every word a question or an answer uses."""


@dataclass(frozen=True)
class ShapeObject:
    """One object: what it is and where (pixel centre, radius)."""

    shape: str
    colour: str
    size: str
    x: int
    y: int

    @property
    def radius(self) -> int:
        """Radius in pixels."""
        return SIZES[self.size]

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Sample:
    """One image, its objects and one question with its one-word answer."""

    image: Image.Image
    objects: tuple[ShapeObject, ...]
    question: str
    answer: str
    kind: str


def _scene(rng: np.random.Generator, image_size: int = IMAGE_SIZE, max_objects: int = 4) -> tuple[ShapeObject, ...]:
    """1–``max_objects`` objects with distinct (colour, shape) pairs that do not overlap."""
    count = int(rng.integers(1, max_objects + 1))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    objects: list[ShapeObject] = []
    for pair_index in chosen:
        colour, shape = pairs[pair_index]
        size = str(rng.choice(list(SIZES)))
        radius = SIZES[size]
        for _ in range(200):
            x, y = (int(v) for v in rng.integers(radius + 4, image_size - radius - 4, size=2))
            if all(math.hypot(x - o.x, y - o.y) > radius + o.radius + 10 for o in objects):
                objects.append(ShapeObject(shape, colour, size, x, y))
                break
    return tuple(objects)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill: tuple[int, int, int] | int | None = None) -> None:
    r = obj.radius
    fill = COLOURS[obj.colour] if fill is None else fill
    if obj.shape == "circle":
        draw.ellipse((obj.x - r, obj.y - r, obj.x + r, obj.y + r), fill=fill)
    elif obj.shape == "square":
        side = int(r * 0.85)
        draw.rectangle((obj.x - side, obj.y - side, obj.x + side, obj.y + side), fill=fill)
    else:
        draw.polygon(
            [(obj.x, obj.y - r), (obj.x - r, obj.y + int(0.8 * r)), (obj.x + r, obj.y + int(0.8 * r))], fill=fill
        )


def render(objects: tuple[ShapeObject, ...], rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the objects on a cluttered grey background (noise, lines and blobs without colour)."""
    base = rng.integers(70, 150)
    noise = rng.normal(0, 18, size=(image_size, image_size, 1)).repeat(3, axis=2)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        grey = int(rng.integers(30, 220))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, image_size, size=4))
        draw.line((x0, y0, x1, y1), fill=(grey, grey, grey), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(4, 10))):
        grey = int(rng.integers(30, 220))
        x, y = (int(v) for v in rng.integers(0, image_size, size=2))
        r = int(rng.integers(3, 9))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(grey, grey, grey))
    for obj in objects:
        _draw_shape(draw, obj)
    return image


def _candidates(objects: tuple[ShapeObject, ...], kind: str) -> list[tuple[str, str]]:
    """Every unambiguous (question, answer) of one kind the scene supports."""
    shapes = [o.shape for o in objects]
    colours = [o.colour for o in objects]
    if kind == "colour":
        return [(f"what colour is the {o.shape} ?", o.colour) for o in objects if shapes.count(o.shape) == 1]
    if kind == "shape":
        return [(f"what shape is the {o.colour} object ?", o.shape) for o in objects if colours.count(o.colour) == 1]
    if kind == "exists":
        present = {(o.colour, o.shape) for o in objects}
        return [(f"is there a {c} {s} ?", "yes" if (c, s) in present else "no") for c in COLOURS for s in SHAPES]
    if kind == "count":
        return [("how many objects are there ?", COUNT_WORDS[len(objects)])]
    if kind == "size":
        return [(f"is the {o.name} small or large ?", o.size) for o in objects]
    relation = "left of" if kind == "left" else "above"
    pairs = []
    for first in objects:
        for second in objects:
            delta = (second.x - first.x) if kind == "left" else (second.y - first.y)
            if first is not second and abs(delta) >= 2 * PATCH_SIZE:  # closer calls are ambiguous
                pairs.append((f"is the {first.name} {relation} the {second.name} ?", "yes" if delta > 0 else "no"))
    return pairs


def _question(objects: tuple[ShapeObject, ...], rng: np.random.Generator) -> tuple[str, str, str]:
    """A uniformly chosen answerable kind, then a candidate of it with yes/no balanced; (question, answer, kind)."""
    options = {kind: _candidates(objects, kind) for kind in QUESTION_KINDS}
    kinds = [kind for kind, candidates in options.items() if candidates]
    kind = kinds[int(rng.integers(len(kinds)))]
    candidates = options[kind]
    answers = sorted({answer for _, answer in candidates})
    if set(answers) <= {"yes", "no"}:
        wanted = answers[int(rng.integers(len(answers)))]
        candidates = [c for c in candidates if c[1] == wanted]
    question, answer = candidates[int(rng.integers(len(candidates)))]
    return question, answer, kind


def _split_rng(split: str, *key: int) -> np.random.Generator:
    """The random stream of one item of ``split``, keyed by ``key``; unknown splits are an error."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLIT_SEEDS)}")
    return np.random.default_rng([SPLIT_SEEDS[split], *key])


def make_sample(split: str, index: int) -> Sample:
    """Sample ``index`` of ``split`` ("train", "validation" or "test"); the same arguments give the same sample."""
    rng = _split_rng(split, index)
    objects = _scene(rng)
    question, answer, kind = _question(objects, rng)
    return Sample(render(objects, rng), objects, question, answer, kind)


def make_scene(
    split: str, index: int, image_size: int = IMAGE_SIZE, max_objects: int = 4
) -> tuple[Image.Image, tuple[ShapeObject, ...]]:
    """Scene ``index`` of ``split`` without a question, optionally smaller (vision pre-training at low resolution).

    Scenes use their own random streams, apart from samples' and conversations'.
    """
    rng = _split_rng(split, index, image_size, max_objects)
    objects = _scene(rng, image_size, max_objects)
    return render(objects, rng, image_size), objects


@dataclass(frozen=True)
class Conversation:
    """One image with several distinct questions about it (multi-turn training data, as LLaVA's)."""

    image: Image.Image
    objects: tuple[ShapeObject, ...]
    turns: tuple[tuple[str, str, str], ...]
    """``(question, answer, kind)`` per turn."""


def make_conversation(split: str, index: int, turns: int) -> Conversation:
    """Conversation ``index`` of ``split``: up to ``turns`` distinct questions about one scene.

    Conversations use their own random streams, so conversation ``i`` and :func:`make_sample` ``i``
    of a split are different scenes.
    """
    rng = _split_rng(split, index, turns)
    objects = _scene(rng)
    chosen: dict[str, tuple[str, str, str]] = {}
    for _ in range(4 * turns):
        if len(chosen) == turns:
            break
        question, answer, kind = _question(objects, rng)
        chosen.setdefault(question, (question, answer, kind))
    return Conversation(render(objects, rng), objects, tuple(chosen.values()))


def samples(split: str, count: int, start: int = 0) -> Iterator[Sample]:
    """``count`` consecutive samples of a split."""
    for index in range(start, start + count):
        yield make_sample(split, index)


def object_patches(objects: tuple[ShapeObject, ...]) -> set[int]:
    """Row-major indices of the patches an object's bounding box touches (for analysing kept tokens)."""
    cells: set[int] = set()
    for obj in objects:
        r = obj.radius
        for row in range(max(0, (obj.y - r) // PATCH_SIZE), min(GRID, (obj.y + r) // PATCH_SIZE + 1)):
            for column in range(max(0, (obj.x - r) // PATCH_SIZE), min(GRID, (obj.x + r) // PATCH_SIZE + 1)):
                cells.add(row * GRID + column)
    return cells


def patch_labels(objects: tuple[ShapeObject, ...], min_cover: float = 0.2) -> np.ndarray:
    """Per patch (row-major), 1 + the index of the object covering at least ``min_cover`` of it, else 0."""
    label_image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(label_image)
    for index, obj in enumerate(objects):
        _draw_shape(draw, obj, fill=index + 1)
    pixels = np.asarray(label_image).reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).transpose(0, 2, 1, 3)
    pixels = pixels.reshape(GRID * GRID, PATCH_SIZE * PATCH_SIZE)
    labels = np.zeros(GRID * GRID, dtype=np.int64)
    for index in range(len(objects)):
        cover = (pixels == index + 1).mean(axis=1)
        labels[cover >= min_cover] = index + 1
    return labels
