"""The bundled reference model: a small LLaVA-1.5-format model trained by this project on shapes VQA.

It is the CLI's default model, so everything runs offline on a fresh machine, and the model the
accuracy benchmark (``flowcut eval``) and CI's accuracy guard measure. ``flowcut.reference.train``
reproduces it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

BUNDLED_MODEL = "shapes-llava"


def bundled_model_path() -> Path:
    """Directory of the bundled model (``save_pretrained`` layout, loadable by ``from_pretrained``)."""
    return Path(str(files("flowcut") / "assets" / BUNDLED_MODEL))
