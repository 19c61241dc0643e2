"""BLIP for image-text retrieval (`BlipForImageTextRetrieval`): ViT + BERT text encoder with cross-attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import (
    LayerStack,
    MlpUnit,
    ModelAdapter,
    TrainOutputs,
    VisionTower,
    _bert_attention,
    _layers_units,
    _patch_tokens,
    _pixel_values,
    _seeded_init,
    get_submodule,
    same_ids_mask,
    same_text_mask,
)
from .clip import symmetric_cross_entropy

TEXT_LAYERS = "text_encoder.encoder.layer"
ITC_TEMPERATURE = 0.07  # BLIP's contrastive temperature at initialisation (the retrieval head keeps no learned one)


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

    def layer_stacks(self, model):
        return {"vision": LayerStack("vision", "vision_model.encoder.layers", "vision_config"),
                "text": LayerStack("text", TEXT_LAYERS, "text_config")}

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


def blip_collate(processor, rows: list[dict]) -> dict[str, torch.Tensor]:
    texts = [r["text"] for r in rows]
    batch = dict(processor(text=texts, images=[r["image"] for r in rows], padding=True, return_tensors="pt"))
    return batch | {"same_text": same_text_mask(texts)}


def blip_train_outputs(model, batch: dict[str, torch.Tensor]) -> TrainOutputs:
    """BLIP's retrieval losses: image-text contrastive (ITC: cosine similarities of the projected CLS tokens over
    `ITC_TEMPERATURE`, both ways) plus image-text matching (ITM: the cross-attending text encoder's 2-way head on
    every matched pair and, as negative, every image with the next row's caption unless the captions are equal)."""
    same = batch.get("same_text")
    same = same_ids_mask(batch["input_ids"]) if same is None else same
    inputs = {k: v for k, v in batch.items() if k != "same_text"}
    sims = model(**inputs, use_itm_head=False).itm_score / ITC_TEMPERATURE  # [B images, B texts]
    itc = symmetric_cross_entropy(sims, same.to(sims.device))
    b = len(sims)
    shifted = torch.roll(torch.arange(b), -1)
    pairs = {"input_ids": torch.cat([inputs["input_ids"], inputs["input_ids"][shifted]]),
             "pixel_values": torch.cat([inputs["pixel_values"], inputs["pixel_values"]])}
    if "attention_mask" in inputs:
        pairs["attention_mask"] = torch.cat([inputs["attention_mask"], inputs["attention_mask"][shifted]])
    itm_logits = model(**pairs, use_itm_head=True).itm_score  # [2B, 2]
    negative_is_match = same[torch.arange(b), shifted].long()
    labels = torch.cat([torch.ones(b, dtype=torch.long), negative_is_match]).to(itm_logits.device)
    itm = F.cross_entropy(itm_logits, labels)
    return TrainOutputs(itc + itm, {"itc_image_to_text": sims, "itc_text_to_image": sims.t(), "itm": itm_logits})


BlipAdapter.collate = staticmethod(blip_collate)
BlipAdapter.train_outputs = staticmethod(blip_train_outputs)
