"""LLaVA-1.5 (``LlavaForConditionalGeneration`` with a CLIP vision tower).

FlowCut enters through the instance's ``get_image_features`` (used by both ``forward`` and
``generate``): it runs the CLIP tower only up to the feature layer with the encoder stage, projects
the ``keep`` surviving patches and hands them to the unchanged language model. The processor side
shrinks each image's placeholder run to ``keep`` tokens, so the model's own image-token count check
stays on and passes. Language-stage methods (FastV) hand every patch over and prune after a decoder
layer. Everything but the declaration is :class:`~flowcut.families.single_stage.SingleStageFamily`.
"""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration

from flowcut.families.single_stage import SingleStageFamily


class LlavaFamily(SingleStageFamily):
    """Installs FlowCut on one ``LlavaForConditionalGeneration`` instance and removes it again."""

    model_classes = (LlavaForConditionalGeneration,)
    image_tower_name = "vision_tower"
    family_name = "LLaVA"
