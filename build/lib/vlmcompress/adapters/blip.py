"""BLIP for image-text retrieval (`BlipForImageTextRetrieval`): ViT + BERT text encoder with cross-attention."""

from __future__ import annotations

import torch

from .base import (ModelAdapter, MlpUnit, VisionTower, _bert_attention, _layers_units, _patch_tokens,
                   _pixel_values, _seeded_init, get_submodule)

TEXT_LAYERS = "text_encoder.encoder.layer"


class BlipAdapter(ModelAdapter):
    family = "blip"
    stock_classes = ("BlipForImageTextRetrieval",)
    builtin_name = "tiny-blip"
    component_paths = {"vision": "vision_model", "text": "text_encoder"}

    def attention_units(self, model):
        units, _ = _layers_units(model, "vision", "vision_model.encoder.layers", "self_attn", None, "fused")
        for i, layer in enumerate(get_submodule(model, TEXT_LAYERS)):
            units.append(_bert_attention(f"{TEXT_LAYERS}.{i}.attention", "text", i, layer.attention, "self"))
            if getattr(layer, "crossattention", None) is not None:
                units.append(_bert_attention(f"{TEXT_LAYERS}.{i}.crossattention", "text", i, layer.crossattention,
                                             "self"))
        return units

    def mlp_units(self, model):
        _, units = _layers_units(model, "vision", "vision_model.encoder.layers", "self_attn", "mlp", "fused")
        for i, layer in enumerate(get_submodule(model, TEXT_LAYERS)):
            units.append(MlpUnit(name=f"{TEXT_LAYERS}.{i}", component="text", layer=i, module=layer,
                                 up=("intermediate.dense",), down="output.dense"))
        return units

    def vision_tower(self, model):
        return VisionTower("vision_model.encoder.layers", _patch_tokens(model.config.vision_config) + 1, True)

    def cross_attention_tower(self, model):
        return VisionTower(TEXT_LAYERS, _patch_tokens(model.config.vision_config) + 1, True,
                           hook_path=TEXT_LAYERS.rpartition(".")[0])

    def tiny_model(self, seed=0):
        from transformers import BlipConfig, BlipForImageTextRetrieval

        from .clip import TINY_VISION

        _seeded_init(seed)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    vocab_size=100, encoder_hidden_size=32, max_position_embeddings=32, bos_token_id=1,
                    eos_token_id=3, pad_token_id=0, sep_token_id=3, initializer_range=0.02)
        config = BlipConfig(vision_config=TINY_VISION, text_config=text, projection_dim=16, image_text_hidden_size=16)
        return BlipForImageTextRetrieval(config).eval()

    def example_inputs(self, model, batch_size=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(4, model.config.text_config.vocab_size, (batch_size, 8), generator=g)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": _pixel_values(model.config.vision_config, batch_size, g)}

    def main_outputs(self, model, inputs):
        itm = model(**inputs, use_itm_head=True).itm_score
        cosine = model(**inputs, use_itm_head=False).itm_score
        return {"itm_score": itm, "cosine": cosine}
