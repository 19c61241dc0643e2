"""BLIP-2 (`Blip2ForConditionalGeneration`): ViT → Q-Former (learned queries) → projection → OPT decoder."""

from __future__ import annotations

import torch

from .base import (
    AttentionUnit,
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
)

QFORMER_LAYERS = "qformer.encoder.layer"
LLM_LAYERS = "language_model.model.decoder.layers"


class Blip2Adapter(ModelAdapter):
    family = "blip2"
    stock_classes = ("Blip2ForConditionalGeneration",)
    builtin_name = "tiny-blip2"
    component_paths = {"vision": "vision_model", "qformer": "qformer", "projector": "language_projection",
                       "llm": "language_model"}

    def attention_units(self, model):
        units, _ = _layers_units(model, "vision", "vision_model.encoder.layers", "self_attn", None, "fused")
        for i, layer in enumerate(get_submodule(model, QFORMER_LAYERS)):
            units.append(_bert_attention(f"{QFORMER_LAYERS}.{i}.attention", "qformer", i, layer.attention,
                                         "attention"))
            if getattr(layer, "crossattention", None) is not None:
                units.append(_bert_attention(f"{QFORMER_LAYERS}.{i}.crossattention", "qformer", i,
                                             layer.crossattention, "attention"))
        for i, layer in enumerate(get_submodule(model, LLM_LAYERS)):
            a = layer.self_attn
            units.append(AttentionUnit(name=f"{LLM_LAYERS}.{i}.self_attn", component="llm", layer=i, module=a,
                                       head_dim=a.head_dim, num_heads=a.num_heads, num_kv_heads=a.num_heads,
                                       q="q_proj", k="k_proj", v="v_proj", out="out_proj", head_attrs=("num_heads",)))
        return units

    def mlp_units(self, model):
        _, units = _layers_units(model, "vision", "vision_model.encoder.layers", "self_attn", "mlp", "fused")
        for i, layer in enumerate(get_submodule(model, QFORMER_LAYERS)):
            for up, down in (("intermediate_query", "output_query"), ("intermediate", "output")):
                if getattr(layer, up, None) is not None:
                    units.append(MlpUnit(name=f"{QFORMER_LAYERS}.{i}.{up}", component="qformer", layer=i,
                                         module=layer, up=(f"{up}.dense",), down=f"{down}.dense"))
        for i, layer in enumerate(get_submodule(model, LLM_LAYERS)):
            units.append(MlpUnit(name=f"{LLM_LAYERS}.{i}", component="llm", layer=i, module=layer, up=("fc1",),
                                 down="fc2"))
        return units

    def vision_tower(self, model):
        return VisionTower("vision_model.encoder.layers", _patch_tokens(model.config.vision_config) + 1, True)

    def layer_stacks(self, model):
        return {"vision": LayerStack("vision", "vision_model.encoder.layers", "vision_config"),
                "qformer": LayerStack("qformer", QFORMER_LAYERS, "qformer_config"),
                "llm": LayerStack("llm", LLM_LAYERS, "text_config")}

    def tiny_model(self, seed=0):
        from transformers import Blip2Config, Blip2ForConditionalGeneration

        from .clip import TINY_VISION

        _seeded_init(seed)
        config = Blip2Config(
            vision_config=TINY_VISION | {"qkv_bias": True},
            qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                encoder_hidden_size=32, vocab_size=100),
            text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=100, word_embed_proj_dim=32, max_position_embeddings=64, bos_token_id=1,
                             eos_token_id=2, pad_token_id=0),
            num_query_tokens=4, image_token_index=99)
        return Blip2ForConditionalGeneration(config).eval()

    def example_inputs(self, model, batch_size=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        config = model.config
        text = torch.randint(4, 90, (batch_size, 6), generator=g)
        image_tokens = torch.full((batch_size, config.num_query_tokens), config.image_token_index)
        input_ids = torch.cat([image_tokens, text], dim=1)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": _pixel_values(config.vision_config, batch_size, g)}

    def main_outputs(self, model, inputs):
        return {"logits": model(**inputs).logits}


def caption_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int) -> torch.Tensor:
    """LM labels of a captioning batch: the caption tokens; image placeholders and padding are ignored (-100)."""
    labels = input_ids.masked_fill(input_ids == image_token_id, -100)
    return labels if attention_mask is None else labels.masked_fill(attention_mask == 0, -100)


def blip2_collate(processor, rows: list[dict]) -> dict[str, torch.Tensor]:
    batch = dict(processor(text=[r["text"] for r in rows], images=[r["image"] for r in rows], padding=True,
                           return_tensors="pt"))
    token_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    return batch | {"labels": caption_labels(batch["input_ids"], batch.get("attention_mask"), token_id)}


def blip2_train_outputs(model, batch: dict[str, torch.Tensor]) -> TrainOutputs:
    """Caption language-model loss; the logits are those of the caption tokens `[tokens, vocab]`."""
    if "labels" not in batch:
        batch = batch | {"labels": caption_labels(batch["input_ids"], batch.get("attention_mask"),
                                                  model.config.image_token_index)}
    out = model(**batch)
    labels = batch["labels"]
    logits = out.logits[:, -labels.shape[1]:]
    # the logits at position t predict token t + 1: compare those that predict a caption token
    predicting = labels[:, 1:] != -100
    return TrainOutputs(out.loss, {"tokens": logits[:, :-1][predicting]})


Blip2Adapter.collate = staticmethod(blip2_collate)
Blip2Adapter.train_outputs = staticmethod(blip2_train_outputs)
