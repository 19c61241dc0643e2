"""`finetune`: recovery training (full or LoRA, merged) on the shared trainer (`vlmcompress.train`)."""

from ...registry import register_method
from .stage import FinetuneConfig, FinetuneLoss, FinetuneStage, LoraConfig  # noqa: F401

register_method("finetune", FinetuneConfig, FinetuneStage,
                "recovery training of the compressed model (full or LoRA, merged), optionally distilling logits")

__all__ = ["FinetuneConfig", "FinetuneLoss", "FinetuneStage", "LoraConfig"]
