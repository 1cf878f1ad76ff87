"""What every model family shares at run time: reversible installation on one instance."""

from flowcut.runtime.family import ModelFamily
from flowcut.runtime.instance import InstancePatch

__all__ = ["InstancePatch", "ModelFamily"]
