"""SigLIP (`SiglipModel`): like CLIP, but with a sigmoid loss, no CLS token and an attention-pooling head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import TrainOutputs, VisionTower, _patch_tokens, _seeded_init
from .clip import TINY_TEXT, TINY_VISION, CLIPAdapter, _dual_encoder_inputs, global_logits, model_inputs


class SiglipAdapter(CLIPAdapter):
    """Same module layout as CLIP (`vision_model` / `text_model`, `self_attn` + `mlp` layers)."""

    family = "siglip"
    stock_classes = ("SiglipModel",)
    builtin_name = "tiny-siglip"

    def vision_tower(self, model):
        # SigLIP has no CLS token: every patch may be merged, the pooling head attends over what is left
        return VisionTower("vision_model.encoder.layers", _patch_tokens(model.config.vision_config), False)

    def text_tower(self, model):
        # bidirectional, pooled at the last position (SigLIP pads every text to the same length)
        return VisionTower("text_model.encoder.layers", model.config.text_config.max_position_embeddings, False,
                           hook_path="text_model", text={"causal": False, "eot": "last"})

    def tiny_model(self, seed=0):
        from transformers import SiglipConfig, SiglipModel

        _seeded_init(seed)
        return SiglipModel(SiglipConfig(vision_config=TINY_VISION, text_config=TINY_TEXT | {"eos_token_id": 2})).eval()

    def example_inputs(self, model, batch_size=2, seed=0):
        inputs = _dual_encoder_inputs(model, batch_size, seed)
        inputs.pop("attention_mask")  # SigLIP is trained on padded-to-max text without a mask
        return inputs


def sigmoid_loss(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss on `[B, B]` logits (scale and bias included): every pair is a binary
    problem, positive on the diagonal and for equal captions; summed over pairs, averaged over images."""
    positive = same | torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    signs = positive.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / len(logits)


def siglip_train_outputs(model, batch: dict[str, torch.Tensor]) -> TrainOutputs:
    """The sigmoid loss over the global batch (every process's rows, as SigLIP's all-pairs loss)."""
    out = model(**model_inputs(batch))
    logits, same = global_logits(model, out, batch)
    return TrainOutputs(sigmoid_loss(logits, same.to(logits.device)),
                        {"image_to_text": logits, "text_to_image": logits.t()},
                        {"image": out.image_embeds, "text": out.text_embeds})


# batches as CLIP's (padded to the longest caption, with a mask: as `vlmcompress eval` encodes text)
SiglipAdapter.train_outputs = staticmethod(siglip_train_outputs)
