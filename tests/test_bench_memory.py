"""Peak-memory counting: exact bytes on hand-built allocations, views and in-place results not counted."""

from __future__ import annotations

import torch

from conftest import make_image
from flowcut.tools.bench.memory import LiveTensorBytes, peak_bytes
from flowcut.tools.bench.run import BenchSetting, benchmark

MIB = 2**20


def test_peak_counts_live_storages_until_they_are_freed():
    weight = torch.randn(256, 256)  # exists before: not counted
    with LiveTensorBytes() as counter:
        first = torch.zeros(1024, 256)  # 1 MiB
        second = first @ weight  # 1 MiB; 2 alive
        del first
        flat = second.view(-1)  # a view: no new memory
        doubled = flat * 2  # 1 MiB; 2 alive
        del second, flat
        doubled.add_(1)  # in place: no new memory
        transposed = doubled.view(1024, 256).t()
        third = torch.relu(transposed)  # 1 MiB; 2 alive
        assert counter.live == 2 * MIB
    assert counter.peak == 2 * MIB
    del doubled, transposed, third
    assert counter.live == 0


def test_peak_bytes_returns_the_result():
    peak, result = peak_bytes(lambda: torch.ones(512, 512).sum(), torch.device("cpu"))
    # The float32 sum (4 bytes) is made while the 1 MiB of ones is still alive.
    assert peak == 512 * 512 * 4 + 4 and result == 512 * 512


def test_pruned_prefill_peaks_lower(tiny):
    model, processor = tiny
    settings = [BenchSetting(None), BenchSetting("flowcut", 16)]
    unpruned, pruned = benchmark(model, processor, make_image(0), "what ?", settings, rounds=1, warmup=0, new_tokens=2)
    assert 0 < pruned.peak_prefill_bytes < unpruned.peak_prefill_bytes
    skipped = benchmark(model, processor, make_image(0), "what ?", settings[:1], rounds=1, warmup=0, memory=False)
    assert skipped[0].peak_prefill_bytes is None
