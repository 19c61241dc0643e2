"""PEFT LoRA for `finetune`: adapters on the selected linear layers, merged into their weights before saving (so the
checkpoint holds no PEFT modules and reloads with stock transformers), and optionally saved as the adapter folder
that `PeftModel.from_pretrained` loads.

LoRA reads each layer's own in / out features, so it adapts to layers of different widths after structured pruning
(landscape.md §10)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import optional_import


def add_lora(model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float):
    """Wrap `model` in a `PeftModel` with LoRA on the modules named exactly in `targets`; only the adapters
    train. Returns the PEFT model (its base is `model`, changed in place)."""
    peft = optional_import("peft", "peft", "train")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    return peft.get_peft_model(model, config)


def lora_parameters(peft_model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if "lora_" in n and p.requires_grad}


def save_adapter(peft_model, folder: Path) -> None:
    """The adapter folder (`adapter_config.json`, `adapter_model.safetensors`) for the model before merging."""
    peft_model.save_pretrained(str(folder), safe_serialization=True)


def merge(peft_model) -> nn.Module:
    """Fold the adapters into the base weights and remove every PEFT module; returns the base model."""
    return peft_model.merge_and_unload(progressbar=False)


def peft_modules(model: nn.Module) -> list[str]:
    """Names of modules that belong to PEFT (none after `merge`)."""
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("peft.")]
