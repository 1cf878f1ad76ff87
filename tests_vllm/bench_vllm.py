"""Prefill throughput of the stock LLaVA and FlowCut in vLLM on the bundled model (docs/vllm.md; not a test).

Usage (in the vLLM environment, tests_vllm/ on PYTHONPATH):
    python tests_vllm/bench_vllm.py --keep 64 --images 64 --rounds 3

Each round sends ``--images`` single-image prompts (distinct images, so vLLM's encoder cache never
answers) with one output token, to the stock model and to FlowCut in turn (A B A B ...), and reports
the median wall time per setting, prompt tokens and the speed-up. Both engines run float32, eager.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from vllm_support import KV_CACHE_BYTES, flowcut_overrides, save_hub_checkpoint

from flowcut.data.shapes import make_sample
from flowcut.reference import bundled_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    checkpoint = save_hub_checkpoint(bundled_model_path(), Path(tempfile.mkdtemp()) / "shapes-llava-hub")
    settings = {"stock": {}, f"flowcut@{args.keep}": {"hf_overrides": flowcut_overrides(args.keep)}}
    engines = {
        name: LLM(
            str(checkpoint),
            dtype="float32",
            max_model_len=1024,
            enforce_eager=True,
            kv_cache_memory_bytes=KV_CACHE_BYTES,
            limit_mm_per_prompt={"image": 1},
            mm_processor_cache_gb=0,
            **options,
        )
        for name, options in settings.items()
    }
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    prompt_tokens: dict[str, int] = {}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        start = 1_000 + round_index * args.images  # new images every round: no encoder-cache hits
        samples = [make_sample("test", start + i) for i in range(args.images)]
        requests = [
            {"prompt": f"USER: <image>\n{sample.question} ASSISTANT:", "multi_modal_data": {"image": sample.image}}
            for sample in samples
        ]
        for name, engine in engines.items():
            began = time.perf_counter()
            outputs = engine.generate(requests, greedy, use_tqdm=False)
            elapsed = time.perf_counter() - began
            prompt_tokens[name] = sum(len(output.prompt_token_ids) for output in outputs)
            if round_index:
                seconds[name].append(elapsed)

    stock = statistics.median(seconds["stock"])
    print(f"{args.images} single-image prompts, 1 output token, median of {args.rounds} rounds")
    print("| setting | prompt tokens | seconds (min–max) | images/s | speed-up |")
    print("|---|---|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        speed_up = stock / median
        spread = f"{median:.2f} ({min(values):.2f}–{max(values):.2f})"
        print(f"| {name} | {prompt_tokens[name]} | {spread} | {args.images / median:.1f} | {speed_up:.2f}x |")


if __name__ == "__main__":
    main()
