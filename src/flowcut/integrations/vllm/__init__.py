"""vLLM plugin: FlowCut variants of vLLM's models, registered through the ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in each of its processes. Only the architecture name is registered here,
with the class path as a string, so vLLM imports the model module (and with it vLLM's model code)
only where a model is built. Nothing of vLLM is imported by ``import flowcut``.

Serving: ``vllm serve <llava-1.5 checkpoint> --hf-overrides '{"architectures":
["FlowCutLlavaForConditionalGeneration"], "flowcut_keep": 64}'`` (docs/vllm.md).
"""

from __future__ import annotations

FLOWCUT_LLAVA_ARCHITECTURE = "FlowCutLlavaForConditionalGeneration"
"""Architecture name of FlowCut's LLaVA-1.5 in vLLM's model registry."""

_MODEL_CLASSES = {
    FLOWCUT_LLAVA_ARCHITECTURE: "flowcut.integrations.vllm.llava:FlowCutLlavaForConditionalGeneration",
}


def register() -> None:
    """Register FlowCut's model classes with vLLM's ``ModelRegistry`` (the plugin entry point)."""
    from vllm import ModelRegistry

    for architecture, class_path in _MODEL_CLASSES.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, class_path)


__all__ = ["FLOWCUT_LLAVA_ARCHITECTURE", "register"]
