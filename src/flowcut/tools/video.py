"""Reading a video's frames for the command line: a directory of images, a ``.npy`` array, or a video file.

Video files are decoded with PyAV when it is installed (``pip install av``); the other two forms need
nothing beyond Pillow and NumPy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames (the middle of each of ``count`` equal spans)."""
    if total < 1 or count < 1:
        raise ValueError(f"need at least one frame to sample from and to keep, got {total} and {count}")
    if count >= total:
        return list(range(total))
    return [int((index + 0.5) * total / count) for index in range(count)]


def read_frames(path: str | Path, frames: int | None = None) -> np.ndarray:
    """The video at ``path`` as ``(F, H, W, 3)`` uint8 frames, ``frames`` of them sampled evenly where given.

    ``path`` is a directory of image files (read in name order, all of one size), a ``.npy`` array
    of that shape, or a video file (needs PyAV).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(child for child in path.iterdir() if child.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        chosen = files if frames is None else [files[i] for i in sample_indices(len(files), frames)]
        pictures = [np.asarray(Image.open(file).convert("RGB")) for file in chosen]
        if len({picture.shape for picture in pictures}) > 1:
            raise ValueError(f"the frames in {path} differ in size")
        return np.stack(pictures)
    if not path.is_file():
        raise ValueError(f"video not found: {path}")
    if path.suffix.lower() == ".npy":
        array = np.load(path)
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"{path} must hold a (frames, height, width, 3) array, got shape {array.shape}")
        array = array.astype(np.uint8)
    else:
        array = _decode(path)
    return array if frames is None else array[sample_indices(len(array), frames)]


def _decode(path: Path) -> np.ndarray:
    try:
        import av
    except ImportError as error:
        raise ValueError(
            f"reading {path.name} needs PyAV (pip install av); or pass a directory of frames or a .npy array"
        ) from error
    with av.open(str(path)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not decoded:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(decoded)
