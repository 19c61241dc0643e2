"""CLIP (`CLIPModel`): a vision and a text tower with projections into a shared embedding space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    LayerStack,
    ModelAdapter,
    TrainOutputs,
    VisionTower,
    _layers_units,
    _patch_tokens,
    _pixel_values,
    _seeded_init,
)
from .global_batch import gather_rows, global_same_text, id_keys, text_keys, world_size

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=4, num_channels=3, initializer_range=0.02)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                 max_position_embeddings=32, bos_token_id=1, eos_token_id=3, pad_token_id=0)


def _dual_encoder_inputs(model: nn.Module, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = model.config.text_config
    input_ids = torch.randint(4, text.vocab_size, (batch_size, 8), generator=g)
    input_ids[:, 0] = text.bos_token_id
    input_ids[:, -1] = text.eos_token_id
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": _pixel_values(model.config.vision_config, batch_size, g)}


class CLIPAdapter(ModelAdapter):
    family = "clip"
    stock_classes = ("CLIPModel",)
    builtin_name = "tiny-clip"
    component_paths = {"vision": "vision_model", "text": "text_model"}
    shared_embeddings = True

    def attention_units(self, model):
        va, _ = _layers_units(model, "vision", "vision_model.encoder.layers", "self_attn", None, "separate")
        ta, _ = _layers_units(model, "text", "text_model.encoder.layers", "self_attn", None, "separate")
        return va + ta

    def mlp_units(self, model):
        _, vm = _layers_units(model, "vision", "vision_model.encoder.layers", "self_attn", "mlp", "separate")
        _, tm = _layers_units(model, "text", "text_model.encoder.layers", "self_attn", "mlp", "separate")
        return vm + tm

    def vision_tower(self, model):
        return VisionTower("vision_model.encoder.layers", _patch_tokens(model.config.vision_config) + 1, True)

    def text_tower(self, model):
        text = model.config.text_config
        # CLIPTextModel pools the first eos_token_id, or the largest id for legacy configs with eos_token_id == 2
        eot = "argmax" if text.eos_token_id == 2 else "eos"
        return VisionTower("text_model.encoder.layers", text.max_position_embeddings, False, hook_path="text_model",
                           text={"causal": True, "eot": eot, "eos_token_id": text.eos_token_id})

    def layer_stacks(self, model):
        return {"vision": LayerStack("vision", "vision_model.encoder.layers", "vision_config"),
                "text": LayerStack("text", "text_model.encoder.layers", "text_config")}

    def tiny_model(self, seed=0):
        from transformers import CLIPConfig, CLIPModel

        _seeded_init(seed)
        return CLIPModel(CLIPConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, projection_dim=16)).eval()

    def example_inputs(self, model, batch_size=2, seed=0):
        return _dual_encoder_inputs(model, batch_size, seed)

    def main_outputs(self, model, inputs):
        out = model(**inputs)
        return {"image_embeds": out.image_embeds, "text_embeds": out.text_embeds}


def contrastive_loss(model: nn.Module, processor, rows: list[dict]) -> torch.Tensor:
    """The model's own image-text contrastive loss on `rows` (for Taylor importance)."""
    batch = processor(text=[r["text"] for r in rows], images=[r["image"] for r in rows], padding=True,
                      return_tensors="pt")
    return model(**batch, return_loss=True).loss


def dual_encoder_batch(processor, rows: list[dict], **text_kwargs) -> dict[str, torch.Tensor]:
    """Tokenised captions and pixel values of `rows`, with `text_key` (`[B]` int64, equal for equal captions, which
    are not each other's negatives)."""
    texts = [r["text"] for r in rows]
    batch = dict(processor(text=texts, images=[r["image"] for r in rows], return_tensors="pt", **text_kwargs))
    return batch | {"text_key": text_keys(texts)}


def symmetric_cross_entropy(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """CLIP's loss on `[B, B]` image-to-text logits: cross-entropy both ways, equal captions masked out of each
    other's negatives."""
    logits = logits.masked_fill(same & ~torch.eye(len(logits), dtype=torch.bool, device=logits.device), -1e4)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without what only the loss reads."""
    return {k: v for k, v in batch.items() if k not in ("text_key", "same_text")}


def global_logits(model: nn.Module, out, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-to-text logits over every process's rows (`[N·B, N·B]`, rank order, differentiable; `global_batch.py`)
    and `same` (`[N·B, N·B]` bool, equal captions); with one process, the model's own `logits_per_image`.
    A model with a `logit_bias` (SigLIP) adds it, as its forward does."""
    keys = batch.get("text_key")
    if keys is None:  # a batch built from tensors, without its texts
        keys = id_keys(batch["input_ids"], batch.get("attention_mask"))
    keys = keys.to(out.image_embeds.device)  # NCCL gathers only GPU tensors
    if world_size() == 1:
        return out.logits_per_image, global_same_text(keys)
    core = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    text = gather_rows(out.text_embeds) @ gather_rows(out.image_embeds).t() * core.logit_scale.exp()
    if getattr(core, "logit_bias", None) is not None:
        text = text + core.logit_bias
    return text.t(), global_same_text(keys)


def clip_train_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> TrainOutputs:
    """Contrastive loss over the global batch (every process's rows); the logits are the image-to-text and
    text-to-image similarity rows."""
    out = model(**model_inputs(batch))
    logits, same = global_logits(model, out, batch)
    return TrainOutputs(symmetric_cross_entropy(logits, same.to(logits.device)),
                        {"image_to_text": logits, "text_to_image": logits.t()},
                        {"image": out.image_embeds, "text": out.text_embeds})


CLIPAdapter.task_loss = staticmethod(contrastive_loss)
CLIPAdapter.collate = staticmethod(lambda processor, rows: dual_encoder_batch(processor, rows, padding=True))
CLIPAdapter.train_outputs = staticmethod(clip_train_outputs)
