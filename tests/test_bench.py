"""The efficiency benchmark on a tiny model: interleaved rounds, exact KV-cache bytes and FLOPs, CLI files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import make_image
from flowcut.bench.flops import prefill_flops
from flowcut.bench.run import BenchSetting, benchmark, environment, model_shapes, to_markdown
from flowcut.cli import app
from flowcut.config import FlowCutConfig
from flowcut.tiny import build_tiny_llava, save_tiny_llava

KEEP = 16


def test_benchmark_measures_every_setting_each_round(tiny):
    model, processor = tiny
    settings = [BenchSetting(None), BenchSetting("flowcut", KEEP), BenchSetting("random", KEEP)]
    rounds_done = []
    results = benchmark(
        model,
        processor,
        make_image(0),
        "what ?",
        settings,
        rounds=2,
        warmup=1,
        new_tokens=3,
        on_round=rounds_done.append,
    )
    assert rounds_done == [1, 2]
    assert [result.setting.label for result in results] == ["unpruned", "flowcut@16", "random@16"]
    assert all(len(result.timings.prefill) == len(result.timings.generate) == 2 for result in results)
    unpruned, pruned, _ = results
    text = model.config.text_config
    per_token = (
        2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    )
    assert unpruned.kv_cache_bytes - pruned.kv_cache_bytes == (144 - KEEP) * per_token
    vision, language = model_shapes(model)
    prompt = unpruned.prompt_tokens
    assert unpruned.flops == prefill_flops(vision, language, [144] * vision.layers, 144, prompt)
    assert pruned.visual_tokens == KEEP and pruned.flops.total < unpruned.flops.total
    table = to_markdown(results, environment(model))
    assert "| flowcut@16 | 16 |" in table and "threads" in table
    # FlowCut times its own scoring inside every encoder pass; the other methods have nothing to time.
    # Scoring is part of the same round's encoder call.
    assert len(pruned.timings.scoring) == 2
    assert all(
        0 < scoring < vision for scoring, vision in zip(pruned.timings.scoring, pruned.timings.vision, strict=True)
    )
    assert unpruned.timings.scoring == results[2].timings.scoring == []
    with pytest.raises(ValueError, match="time_scoring=True is a FlowCut setting"):
        FlowCutConfig(keep=KEEP, method="random", time_scoring=True)


def test_benchmark_refuses_impossible_settings_before_measuring(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="needs a later layer"):
        benchmark(model, processor, make_image(0), "what ?", [BenchSetting(None), BenchSetting("fastv", KEEP)])
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        benchmark(model, processor, make_image(0), "what ?", [BenchSetting(None)], rounds=0)


def test_fastv_prefill_flops_count_the_shorter_later_layers(tmp_path):
    model, processor = build_tiny_llava(seed=0, text_layers=4)
    settings = [BenchSetting(None), BenchSetting("fastv", KEEP)]
    unpruned, fastv = benchmark(model, processor, make_image(1), "what ?", settings, rounds=1, warmup=0, new_tokens=2)
    vision, language = model_shapes(model)
    length = unpruned.prompt_tokens + 144
    expected = prefill_flops(
        vision, language, [144] * vision.layers, 144, unpruned.prompt_tokens, [length] * 2 + [length - 128] * 2
    )
    assert fastv.flops == expected


def test_cli_bench_writes_markdown_and_json(tmp_path):
    save_tiny_llava(tmp_path / "model", seed=0)
    make_image(0).save(tmp_path / "image.png")
    arguments = ["bench", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "image.png")]
    options = ["--methods", "flowcut,random", "--budgets", "16", "--rounds", "1", "--warmup", "0"]
    result = CliRunner().invoke(app, [*arguments, *options, "--new-tokens", "2", "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [row["label"] for row in data["results"]] == ["unpruned", "flowcut@16", "random@16"]
    assert data["environment"]["threads"] >= 1 and (tmp_path / "out" / "bench.md").exists()
    assert (tmp_path / "out" / "bench.png").stat().st_size > 1000
    bad = CliRunner().invoke(app, [*arguments, "--methods", "fastvv", "--output", str(tmp_path / "out")])
    assert bad.exit_code == 2 and "unknown method 'fastvv'" in bad.output


def test_preset_has_the_published_shapes_and_runs_in_smoke_mode(tmp_path):
    from flowcut.bench.presets import PRESETS, build_preset

    shapes = PRESETS["llava-1.5-7b"]
    assert (shapes.vision_hidden, shapes.vision_layers, shapes.image_size // shapes.patch_size) == (1024, 24, 24)
    assert (shapes.text_hidden, shapes.text_intermediate, shapes.text_layers, shapes.vocab_size) == (
        4096,
        11008,
        32,
        32064,
    )
    model, _ = build_preset("llava-1.5-7b", text_layers=2, smoke=True)
    assert model.config.text_config.num_hidden_layers == 2 and model.config.text_config.hidden_size == 256
    arguments = ["bench", "--preset", "llava-1.5-7b", "--smoke", "--text-layers", "2", "--no-plot"]
    options = ["--methods", "flowcut", "--budgets", "64", "--rounds", "1", "--warmup", "0", "--new-tokens", "2"]
    result = CliRunner().invoke(app, [*arguments, *options, "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["results"]
    assert [row["visual_tokens"] for row in rows] == [576, 64]
    both = CliRunner().invoke(app, [*arguments, "--model", "x"])
    assert both.exit_code == 2 and "either --model or --preset" in both.output
    flash = CliRunner().invoke(app, [*arguments, *options, "--attention", "flash", "--output", str(tmp_path / "x")])
    assert flash.exit_code == 2 and "--attention must be sdpa or eager, got 'flash'" in flash.output
    unknown = CliRunner().invoke(app, ["bench", "--preset", "llava-13b", "--no-plot"])
    assert (
        unknown.exit_code == 2
        and "unknown preset 'llava-13b'; available: llava-1.5-7b, video-llava-7b" in unknown.output
    )
