"""FlowCut (SPEC §2), with the paper's ablation switches read from the config."""

from __future__ import annotations

from flowcut.core.encoder_stage import EncoderStageSettings, run_encoder_stage
from flowcut.methods import EncoderCall, Method, MethodOutput, register


@register
class FlowCut(Method):
    name = "flowcut"
    summary = "FlowCut (arXiv 2505.19536): progressive, entropy-adaptive pruning by cumulative CLS-view scores"

    def run(self, call: EncoderCall) -> MethodOutput:
        config = call.config
        settings = EncoderStageSettings(
            keep=config.keep,
            feature_layer=call.feature_layer,
            prune_interval=config.prune_interval,
            ema_weight=config.ema_weight,
            record_scores=config.record_scores,
            one_shot=config.schedule == "one_shot",
            uniform_counts=config.counts == "uniform",
            relation_only=config.criteria == "relation",
        )
        stage = run_encoder_stage(call.encoder, call.pixel_values, settings)
        # LLaVA's "default" feature selection: the patch tokens, without CLS.
        return MethodOutput(call.project(stage.hidden_states[:, 1:]), stage.hidden_states, stage.images)
