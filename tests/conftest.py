"""Shared fixtures: tiny random LLaVA models and procedural images, all built offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flowcut.testing import build_tiny_llava

# Strongly initialised vision weights make CLS attention concentrate, so per-image schedules differ.
VISION_OPTIONS = {"vision_layers": 8, "initializer_factor": 6.0}
PROMPT = "USER: <image>\nwhat is the colour of the circle ? ASSISTANT:"


def picture(height: int, width: int, seed: int) -> Image.Image:
    """A random-noise picture of any size (dynamic-resolution models)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def make_image(seed: int, size: int = 84) -> Image.Image:
    """A deterministic noisy image with a few bright blocks."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
    for _ in range(3):
        top, left = rng.integers(0, size - 20, size=2)
        pixels[top : top + 16, left : left + 16] = rng.integers(120, 255, size=3, dtype=np.uint8)
    return Image.fromarray(pixels)


def pytest_terminal_summary(terminalreporter) -> None:
    """Every run states what it tested against (shown with -q too)."""
    import transformers

    from flowcut import compat

    verified = "verified range" if compat.is_verified() else "OUTSIDE the verified range"
    terminalreporter.write_line(
        f"flowcut tested with transformers {transformers.__version__} ({verified} {compat.VERIFIED_TRANSFORMERS}), "
        f"torch {torch.__version__}"
    )


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    """A directory holding a saved tiny LLaVA (``model/``) and one image (``image.png``), for CLI tests."""
    from flowcut.testing import save_tiny_llava

    directory = tmp_path_factory.mktemp("saved")
    save_tiny_llava(directory / "model", seed=0)
    make_image(0).save(directory / "image.png")
    return directory


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny():
    """A fresh tiny LLaVA (float32, SDPA) and its processor."""
    return build_tiny_llava(seed=0, **VISION_OPTIONS)


@pytest.fixture
def images() -> list[Image.Image]:
    return [make_image(seed) for seed in range(3)]
