"""SigLIP (`SiglipModel`): like CLIP, but with a sigmoid loss, no CLS token and an attention-pooling head."""

from __future__ import annotations

from .base import ModelAdapter, VisionTower, _layers_units, _patch_tokens, _seeded_init
from .clip import TINY_TEXT, TINY_VISION, _dual_encoder_inputs


class SiglipAdapter(ModelAdapter):
    family = "siglip"
    stock_classes = ("SiglipModel",)
    builtin_name = "tiny-siglip"
    component_paths = {"vision": "vision_model", "text": "text_model"}

    def attention_units(self, model):
        va, _ = _layers_units(model, "vision", "vision_model.encoder.layers", "self_attn", None, "separate")
        ta, _ = _layers_units(model, "text", "text_model.encoder.layers", "self_attn", None, "separate")
        return va + ta

    def mlp_units(self, model):
        _, vm = _layers_units(model, "vision", "vision_model.encoder.layers", "self_attn", "mlp", "separate")
        _, tm = _layers_units(model, "text", "text_model.encoder.layers", "self_attn", "mlp", "separate")
        return vm + tm

    def vision_tower(self, model):
        # SigLIP has no CLS token: every patch may be merged, the pooling head attends over what is left
        return VisionTower("vision_model.encoder.layers", _patch_tokens(model.config.vision_config), False)

    def tiny_model(self, seed=0):
        from transformers import SiglipConfig, SiglipModel

        _seeded_init(seed)
        text = {k: v for k, v in TINY_TEXT.items()} | {"eos_token_id": 2}
        return SiglipModel(SiglipConfig(vision_config=TINY_VISION, text_config=text)).eval()

    def example_inputs(self, model, batch_size=2, seed=0):
        inputs = _dual_encoder_inputs(model, batch_size, seed)
        inputs.pop("attention_mask")  # SigLIP is trained on padded-to-max text without a mask
        return inputs

    def main_outputs(self, model, inputs):
        out = model(**inputs)
        return {"image_embeds": out.image_embeds, "text_embeds": out.text_embeds}
