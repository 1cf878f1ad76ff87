"""Save an UNTRAINED LLaVA-1.5-shaped demo model and a demo image (until the trained offline model lands).

The model has LLaVA-1.5's token geometry (336-px images, 14-px patches: a 24×24 grid of 576
patches, 24 CLIP layers, features from layer -2), so ``--keep 64`` prunes on the paper's
schedule; its weights are random, so its answers are meaningless.

    python scripts/make_demo_model.py build/demo
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flowcut.tiny import save_tiny_llava


def demo_image(size: int = 336, seed: int = 0) -> Image.Image:
    """A cluttered background with a red circle, a blue square and a yellow triangle."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(40, 110, size=(size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 50, 110, 120), fill=(220, 30, 30))
    draw.rectangle((200, 60, 260, 120), fill=(30, 60, 220))
    draw.polygon([(150, 300), (190, 220), (230, 300)], fill=(230, 210, 30))
    return image


def main(directory: str) -> None:
    out = Path(directory)
    save_tiny_llava(
        out / "model",
        seed=0,
        image_size=336,
        patch_size=14,
        vision_layers=24,
        vision_hidden=64,
        initializer_factor=4.0,
    )
    demo_image().save(out / "image.png")
    print(f"saved an untrained demo model to {out / 'model'} and an image to {out / 'image.png'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/demo")
