"""Peak memory of one call, above what was allocated before it (the efficiency benchmark's memory column).

On CUDA this is the caching allocator's own peak (``torch.cuda.max_memory_allocated``), which
includes kernels' workspaces. Elsewhere no allocator statistics exist, so :class:`LiveTensorBytes`
counts the bytes of every tensor storage the call's operators create while it is alive: the
activations, caches and outputs of the call, without the inner buffers of fused kernels (for
example, inside SDPA's CPU kernel) and without growth of a storage after it was made (``resize_``,
``out=`` into an empty tensor; model forwards do not rely on them). Both leave out the weights and
the inputs, which exist before the call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Counts the storages operators create under it, until each is freed; ``peak`` is the highest total.

    Outputs that share an input's storage (views, in-place results) are not new memory and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: weakref.WeakSet[torch.UntypedStorage] = weakref.WeakSet()

    def _freed(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        output = func(*args, **(kwargs or {}))
        inputs = {
            tensor.untyped_storage().data_ptr()
            for tensor in tree_flatten((args, kwargs))[0]
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta"
        }
        for tensor in tree_flatten(output)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            size = storage.nbytes()
            if size == 0 or storage.data_ptr() in inputs or storage in self._counted:
                continue
            self._counted.add(storage)
            self.live += size
            weakref.finalize(storage, self._freed, size)
        self.peak = max(self.peak, self.live)
        return output


def peak_bytes(work: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """Run ``work`` and return (peak bytes it allocated above what was allocated before, its result)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    with LiveTensorBytes() as counter:
        result = work()
    return counter.peak, result
