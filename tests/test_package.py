"""The package's import graph: the runtime does not pull in the offline test models or the training code."""

from __future__ import annotations

import subprocess
import sys


def test_the_runtime_imports_neither_the_test_models_nor_the_training_code():
    offline = ("flowcut.testing", "flowcut.reference.train")
    probe = f"import sys, flowcut; print(sorted(m for m in sys.modules if m.startswith({offline!r})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
