"""flowcut-vlm: FlowCut visual-token pruning for vision-language models on stock transformers."""

from flowcut.api import FlowCutHandle, apply, flowcut, get_handle, supported_model_classes
from flowcut.config import METHODS, FlowCutConfig
from flowcut.trace import PruningTrace

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "FlowCutConfig",
    "FlowCutHandle",
    "PruningTrace",
    "__version__",
    "apply",
    "flowcut",
    "get_handle",
    "supported_model_classes",
]
