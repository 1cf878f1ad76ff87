"""FlowCut (SPEC §2), with the paper's ablation switches read from the config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowcut.core.encoder_stage import EncoderStageOutput, EncoderStageSettings, run_encoder_stage
from flowcut.methods import EncoderCall, Method, MethodOutput, UnitCall, register

if TYPE_CHECKING:
    from flowcut.config import FlowCutConfig


def stage_settings(config: FlowCutConfig, keep: int, feature_layer: int) -> EncoderStageSettings:
    """The encoder-stage settings a configuration asks for (the paper's ablation switches included)."""
    return EncoderStageSettings(
        keep=keep,
        feature_layer=feature_layer,
        prune_interval=config.prune_interval,
        ema_weight=config.ema_weight,
        record_scores=config.record_scores,
        time_scoring=config.time_scoring,
        one_shot=config.schedule == "one_shot",
        uniform_counts=config.counts == "uniform",
        relation_only=config.criteria == "relation",
    )


@register
class FlowCut(Method):
    name = "flowcut"
    summary = "FlowCut (arXiv 2505.19536): progressive, entropy-adaptive pruning by cumulative CLS-view scores"
    language_score = "flowcut"
    """Two-stage families (LLaVA-NeXT, Qwen2-VL) finish in the language model with SPEC §3's score."""
    finishes_in_language_model = True
    settings = frozenset(
        {"schedule", "counts", "criteria", "prune_interval", "ema_weight", "record_scores", "time_scoring"}
    )

    def run(self, call: EncoderCall) -> MethodOutput:
        settings = stage_settings(call.config, call.config.keep, call.feature_layer)
        stage = run_encoder_stage(call.encoder, call.pixel_values, settings)
        # LLaVA's "default" feature selection: the patch tokens, without CLS.
        features = call.project(stage.hidden_states[:, 1:])
        return MethodOutput(features, stage.hidden_states, stage.images, scoring_seconds=stage.scoring_seconds)

    def select_units(self, call: UnitCall) -> EncoderStageOutput:
        settings = stage_settings(call.config, max(call.keeps), call.feature_layer)
        return run_encoder_stage(call.encoder, call.pixel_values, settings, call.counts, call.keeps, call.eligible)
