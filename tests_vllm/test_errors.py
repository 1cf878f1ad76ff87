"""A bad FlowCut setting stops ``LLM(...)`` with the plugin's own message, before any model is served."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_support import make_llm


def test_missing_keep_stops_the_engine_with_instructions(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"needs the number of visual tokens to keep per image: pass --hf-overrides"):
        make_llm(checkpoint, keep=None)


def test_keep_above_the_patches_stops_the_engine(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"flowcut_keep=600 does not prune: this model has 576 patches per image"):
        make_llm(checkpoint, keep=600)
