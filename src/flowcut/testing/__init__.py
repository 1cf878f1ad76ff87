"""Offline tiny models for tests and presets: random weights from configs, a word-level tokenizer built locally.

Nothing here downloads anything. The runtime (``flowcut.apply`` and the families) never imports this
package; the test suite, ``flowcut bench --preset`` and the bundled model's training do.
"""

from flowcut.testing.models import (
    FrameVideoProcessor,
    build_processor,
    build_tiny_gemma3,
    build_tiny_internvl,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_llava_next_video,
    build_tiny_llava_onevision,
    build_tiny_qwen,
    build_tiny_video_llava,
    build_tokenizer,
    save_tiny_llava,
    tiny_llava_config,
)

__all__ = [
    "FrameVideoProcessor",
    "build_processor",
    "build_tiny_gemma3",
    "build_tiny_internvl",
    "build_tiny_llava",
    "build_tiny_llava_next",
    "build_tiny_llava_next_video",
    "build_tiny_llava_onevision",
    "build_tiny_qwen",
    "build_tiny_video_llava",
    "build_tokenizer",
    "save_tiny_llava",
    "tiny_llava_config",
]
