"""The efficiency benchmark on a tiny model: interleaved rounds, exact KV-cache bytes and FLOPs, CLI files."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import make_image
from flowcut.config import FlowCutConfig
from flowcut.testing import build_tiny_llava, save_tiny_llava
from flowcut.tools.bench.flops import prefill_flops, vision_flops
from flowcut.tools.bench.run import BenchSetting, benchmark, environment, model_shapes, to_markdown
from flowcut.tools.cli import app

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
    vision, _, language = model_shapes(model)
    prompt = unpruned.prompt_tokens
    assert unpruned.flops == prefill_flops(vision, language, [144] * vision.layers, 144, prompt)
    assert pruned.visual_tokens == KEEP and pruned.flops.total < unpruned.flops.total
    table = to_markdown(results, environment(model))
    assert "| flowcut@16 | 16 |" in table and "threads" in table
    # FlowCut times its own scoring inside every encoder pass; the other methods have nothing to time.
    # The scoring time is measured in the round's prefill (its encoder pass), so it is part of that prefill's
    # time; the separately timed encoder call is another pass, which a busy machine may run faster.
    assert len(pruned.timings.scoring) == 2
    assert all(
        0 < scoring < prefill for scoring, prefill in zip(pruned.timings.scoring, pruned.timings.prefill, strict=True)
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
    vision, _, language = model_shapes(model)
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
    from flowcut.tools.bench.presets import PRESETS, build_preset

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
        and "unknown preset 'llava-13b'; available: llava-1.5-7b, video-llava-7b, llava-next-7b, qwen2-vl-7b, "
        "qwen3-vl-8b"
        in unknown.output
    )


@pytest.mark.parametrize(
    ("name", "budget", "visual"),
    [("llava-next-7b", "160", [2928, 160]), ("qwen2-vl-7b", "64", [576, 64]), ("qwen3-vl-8b", "64", [441, 64])],
)
def test_two_stage_presets_run_in_smoke_mode_at_their_reference_resolution(tmp_path, name, budget, visual):
    """LLaVA-NeXT's 672-px picture is 4 crops + the base view (2,928 tokens); Qwen2-VL's gives 576 merged tokens,
    Qwen3-VL's (16-px patches) 441."""
    arguments = ["bench", "--preset", name, "--smoke", "--text-layers", "3", "--no-plot", "--no-generate"]
    options = ["--methods", "flowcut,fastv", "--budgets", budget, "--rounds", "1", "--warmup", "0"]
    result = CliRunner().invoke(app, [*arguments, *options, "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [row["visual_tokens"] for row in rows] == [*visual, int(budget)]
    unpruned, pruned, fastv = rows
    assert unpruned["timings"]["generate"] == [] and unpruned["decode_tokens_per_second"] is None
    # FlowCut prunes in the encoder: less vision work; FastV leaves the encoder whole.
    assert pruned["flops"]["vision"] < unpruned["flops"]["vision"] == fastv["flops"]["vision"]
    assert pruned["flops"]["total"] < fastv["flops"]["total"] < unpruned["flops"]["total"]
    assert len(pruned["timings"]["scoring"]) == 1 and pruned["timings"]["scoring"][0] > 0
    assert pruned["peak_prefill_bytes"] > 0 and pruned["kv_cache_bytes"] < unpruned["kv_cache_bytes"]
    assert "| – |" in (tmp_path / "bench.md").read_text()  # no generation: its columns say so


def test_two_stage_preset_shapes_are_the_published_ones():
    from flowcut.tools.bench.presets import PRESETS, build_preset

    next_7b, qwen = PRESETS["llava-next-7b"], PRESETS["qwen2-vl-7b"]
    assert (next_7b.vision_hidden, next_7b.text_hidden, next_7b.picture_size) == (1024, 4096, 672)
    assert (qwen.vision_hidden, qwen.vision_intermediate, qwen.vision_layers) == (1280, 5120, 32)
    assert (qwen.text_hidden, qwen.text_intermediate, qwen.text_layers, qwen.text_kv_heads) == (3584, 18944, 28, 4)
    model, _ = build_preset("qwen2-vl-7b", text_layers=3, smoke=True)
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.embed_dim, vision.mlp_ratio, vision.depth, text.vocab_size) == (80, 4, 32, 152064)
    qwen3 = PRESETS["qwen3-vl-8b"]
    assert (qwen3.vision_hidden, qwen3.vision_intermediate, qwen3.vision_layers, qwen3.patch_size) == (
        1152,
        4304,
        27,
        16,
    )
    assert (qwen3.text_hidden, qwen3.text_intermediate, qwen3.text_layers, qwen3.text_kv_heads) == (4096, 12288, 36, 8)
    model, _ = build_preset("qwen3-vl-8b", text_layers=3, smoke=True)
    vision = model.config.vision_config
    assert (vision.hidden_size, vision.depth, vision.deepstack_visual_indexes) == (64, 27, [8, 16, 24])
    assert vision.num_position_embeddings == 48**2


def test_gemma3_preset_has_the_published_shapes_and_runs_in_smoke_mode(tmp_path):
    from flowcut.tools.bench.presets import PRESETS, build_preset

    gemma = PRESETS["gemma-3-4b"]
    assert (gemma.image_size // gemma.patch_size, gemma.pooled_tokens, gemma.vision_layers) == (64, 256, 27)
    assert (gemma.text_hidden, gemma.text_heads, gemma.text_head_dim, gemma.text_kv_heads) == (2560, 8, 256, 4)
    model, _ = build_preset("gemma-3-4b", text_layers=3, smoke=True)
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.hidden_size, vision.image_size, model.config.mm_tokens_per_image) == (64, 896, 256)
    assert (text.hidden_size, text.head_dim, text.vocab_size) == (160, 16, 262208)
    arguments = ["bench", "--preset", "gemma-3-4b", "--smoke", "--text-layers", "3", "--no-plot", "--no-generate"]
    options = ["--methods", "flowcut", "--budgets", "64", "--rounds", "1", "--warmup", "0", "--no-memory"]
    result = CliRunner().invoke(app, [*arguments, *options, "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    unpruned, pruned = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert (unpruned["visual_tokens"], pruned["visual_tokens"]) == (256, 64)
    assert pruned["flops"]["vision"] < unpruned["flops"]["vision"]
    assert pruned["flops"]["projector"] * 4 == unpruned["flops"]["projector"]  # one matrix per pooled token


def test_internvl_preset_has_the_published_shapes_and_counts_its_tiles():
    from flowcut.tools.bench.presets import PRESETS, build_preset
    from flowcut.tools.bench.run import model_shapes

    internvl = PRESETS["internvl3-8b"]
    assert (internvl.image_size // internvl.patch_size, internvl.vision_layers, internvl.picture_size) == (32, 24, 896)
    assert (internvl.text_hidden, internvl.text_layers, internvl.text_kv_heads) == (3584, 28, 4)
    model, processor = build_preset("internvl3-8b", text_layers=2, smoke=True)
    vision, projector, _ = model_shapes(model)
    assert (vision.num_patches, vision.class_tokens, projector.in_features) == (1024, 1, 4 * 64)
    picture = Image.new("RGB", (896, 896))
    assert processor.image_processor(images=[picture], return_tensors="pt")["pixel_values"].shape[0] == 5


@pytest.mark.parametrize("family", ["qwen2-vl", "llava-next"])
def test_two_stage_traces_carry_the_scoring_time_through_generate(family):
    """generate() encodes before its prefill; the encodings bring their scoring time to the prefill's trace."""
    import torch

    import flowcut
    from flowcut.testing import build_tiny_llava_next, build_tiny_qwen
    from flowcut.tools.prompting import prompt_inputs

    if family == "qwen2-vl":
        model, processor = build_tiny_qwen("2", max_pixels=64 * 64)
        image = make_image(0).resize((64, 64))
    else:
        model, processor = build_tiny_llava_next(text_layers=3)
        image = make_image(0).resize((168, 168))
    for timed in (True, False):
        with flowcut.apply(model, processor=processor, config=FlowCutConfig(keep=8, time_scoring=timed)) as handle:
            inputs = prompt_inputs(processor, image, "what ?", torch.device("cpu"), torch.float32)
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            scoring = handle.last_trace.scoring_ms
            assert (scoring > 0) if timed else (scoring is None)


def test_families_without_a_flop_model_are_timed_with_flops_left_out():
    """Qwen2.5-VL's windowed attention has no analytic count yet: its FLOP cells say "–", nothing is made up."""
    from flowcut.testing import build_tiny_qwen
    from flowcut.tools.bench.run import to_dict

    model, processor = build_tiny_qwen("2.5", max_pixels=64 * 64)
    settings = [BenchSetting(None), BenchSetting("flowcut", 4)]
    results = benchmark(model, processor, make_image(0).resize((64, 64)), "what ?", settings, rounds=1, warmup=0)
    assert [result.flops for result in results] == [None, None]
    assert [result.visual_tokens for result in results] == [64, 4]
    assert to_dict(results, environment(model))["results"][1]["flops"] is None
    row = to_markdown(results, environment(model)).splitlines()[-1]
    assert row.startswith("| flowcut@4 | 4 |") and row.count("| – |") == 2  # GFLOPs and FLOP-bound speed-up


def test_video_that_takes_the_stock_path_counts_every_frame_whole():
    """FastV leaves a LLaVA-NeXT-Video video's frames whole (the trace has no frame traces): stock encoder FLOPs."""
    import numpy as np

    from flowcut.testing import build_tiny_llava_next_video

    model, processor = build_tiny_llava_next_video(text_layers=3)
    clip = np.stack([np.asarray(make_image(frame)) for frame in range(4)])
    settings = [BenchSetting(None), BenchSetting("fastv", 8), BenchSetting("flowcut", 8)]
    unpruned, fastv, pruned = benchmark(
        model, processor, None, "what ?", settings, rounds=1, warmup=0, video=clip, generate=False, memory=False
    )
    vision, _, _ = model_shapes(model)
    assert unpruned.visual_tokens == 4 * 36 and fastv.visual_tokens == pruned.visual_tokens == 8
    assert fastv.flops.vision == unpruned.flops.vision == 4 * vision_flops(vision, [144] * vision.layers)
    assert pruned.flops.vision < unpruned.flops.vision and fastv.flops.language < unpruned.flops.language
    assert unpruned.peak_prefill_bytes is None


@pytest.mark.parametrize("family", ["qwen2-vl", "llava-next"])
@pytest.mark.parametrize("method", ["visionzip", "pool"])
def test_encoder_baselines_on_two_stage_families_project_only_their_kept_units(family, method):
    """The encoder ran unpruned up to its feature layer (LLaVA-NeXT: no later layer, no crop without a share),
    but only the kept units reach the projector."""
    from flowcut.testing import build_tiny_llava_next, build_tiny_qwen
    from flowcut.tools.bench.flops import projector_flops

    if family == "qwen2-vl":
        model, processor = build_tiny_qwen("2", max_pixels=64 * 64)
        image = make_image(0).resize((64, 64))
    else:
        model, processor = build_tiny_llava_next(text_layers=3)
        image = make_image(0).resize((168, 168))
    settings = [BenchSetting(None), BenchSetting(method, 8)]
    unpruned, pruned = benchmark(model, processor, image, "what ?", settings, rounds=1, warmup=0, generate=False)
    _, projector, _ = model_shapes(model, patches=64)
    assert pruned.visual_tokens == 8
    assert 0 < pruned.flops.vision <= unpruned.flops.vision
    assert pruned.flops.projector == projector_flops(projector, 8)


def _result(label_method, keep, vision, prefill, flops_total):
    from flowcut.tools.bench.flops import PrefillFlops
    from flowcut.tools.bench.run import BenchResult, Timings

    timings = Timings(vision=list(vision), prefill=list(prefill))
    flops = PrefillFlops(flops_total, 0, 0)
    return BenchResult(BenchSetting(label_method, keep), timings, 64, 10, 0, flops, 8)


def test_impossible_or_noisy_numbers_are_flagged():
    from flowcut.tools.bench.run import warnings_for

    steady = [
        _result(None, None, [10, 11, 10], [100, 101, 99], 1000),
        _result("flowcut", 64, [8, 8, 8], [40, 41, 40], 300),  # 2.5× measured against a 3.33× bound
    ]
    assert warnings_for(steady) == []
    noisy = [
        _result(None, None, [10], [100], 1000),
        _result("flowcut", 64, [8], [5], 500),  # 20× measured against a 2× bound, prefill below the encoder
    ]
    notes = warnings_for(noisy)
    assert notes == [
        "only 1 measured round(s): timings are single samples; use --rounds 3 or more",
        "flowcut@64: the prefill (5.0 ms) includes the encoder yet measured below it (8.0 ms): noisy timings; "
        "raise --rounds and --warmup",
        "flowcut@64: measured prefill speed-up 20.00× is far above its FLOP bound 2.00×: noise or warm-up "
        "effects; raise --rounds and --warmup",
    ]
    assert [line for line in to_markdown(noisy, {}).splitlines() if line.startswith("Warning: ")] == [
        f"Warning: {note}." for note in notes
    ]


def test_encoder_only_mode_is_benchmarked_next_to_the_two_stage_one(tmp_path):
    """``flowcut:encoder`` is FlowCut keeping T in the encoder alone; the plain name is the paper's two stages."""
    from flowcut.testing import build_tiny_qwen

    assert BenchSetting.parse("flowcut:encoder", 8) == BenchSetting("flowcut", 8, "encoder")
    assert BenchSetting.parse("flowcut:encoder", 8).label == "flowcut:encoder@8"
    assert BenchSetting.parse("visionzip", 0.5).label == "visionzip@0.5"
    with pytest.raises(ValueError, match="'flowcut:decoder': write a method name, or 'name:encoder'"):
        BenchSetting.parse("flowcut:decoder", 8)
    with pytest.raises(ValueError, match="'fastv' prunes only inside the language model"):
        BenchSetting.parse("fastv:encoder", 8)
    with pytest.raises(ValueError, match="'none:encoder': method 'none' prunes nowhere"):
        BenchSetting.parse("none:encoder", 8)
    with pytest.raises(ValueError, match="'flowcut:': write a method name, or 'name:encoder'"):
        BenchSetting.parse("flowcut:", 8)
    llava, llava_processor = build_tiny_llava(vision_layers=3, text_layers=2)
    with pytest.raises(ValueError, match="LLaVA prunes in the vision encoder alone: 'name:encoder' is the same"):
        benchmark(
            llava,
            llava_processor,
            make_image(0),
            "what ?",
            [BenchSetting(None), BenchSetting.parse("flowcut:encoder", 8)],
        )
    model, processor = build_tiny_qwen("2", max_pixels=64 * 64)
    settings = [BenchSetting(None), BenchSetting.parse("flowcut", 4), BenchSetting.parse("flowcut:encoder", 4)]
    unpruned, two_stage, encoder_only = benchmark(
        model, processor, make_image(0).resize((64, 64)), "what ?", settings, rounds=1, warmup=0, generate=False
    )
    assert [result.visual_tokens for result in (unpruned, two_stage, encoder_only)] == [64, 4, 4]
    # the two stages hand 2T groups to the language model's first layers; encoder-only hands T
    assert encoder_only.flops.language < two_stage.flops.language < unpruned.flops.language
    assert encoder_only.flops.vision < unpruned.flops.vision
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            "x",
            "--methods",
            "fastv:encoder",
            "--budgets",
            "4",
            "--no-plot",
            "--output",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2 and "'fastv' prunes only inside the language model" in result.output
