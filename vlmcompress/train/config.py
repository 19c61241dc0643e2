"""The `train:` block every training stage shares (finetune, distill, and the learned methods to come). Pydantic only:
recipes validate without torch."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..schema import StrictModel

PositiveInt = Annotated[int, Field(gt=0)]


class TrainConfig(StrictModel):
    """How a stage trains: length, batch, optimiser (AdamW, warm-up then cosine decay), precision, evaluation,
    saving and logging."""

    steps: PositiveInt | None = Field(None, description="optimizer steps (give steps or epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over data.train.size samples (give steps or epochs)")
    batch_size: PositiveInt = Field(32, description="samples per micro-batch (per process)")
    grad_accum: PositiveInt = Field(1, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate of AdamW")
    new_module_lr: float | None = Field(None, gt=0, description="peak learning rate of modules the stage adds (LoRA "
                                                                 "adapters, learned tokens); default: lr")
    warmup: float = Field(0.1, ge=0, description="warm-up: < 1 a fraction of the steps, ≥ 1 a number of steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases and norms)")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's (β1, β2); CLIP-style contrastive "
                                                                       "training often uses (0.9, 0.98)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm (null: no clipping)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast precision; bf16 runs on CPUs (faster only with AMX), fp16 needs a GPU")
    patch_dropout: float = Field(0.0, ge=0, lt=1, description="fraction of each training image's patch tokens "
                                 "dropped at random before the first vision layer (PatchDropout / FLIP): cheaper steps; "
                                 "evaluation and the saved model see every patch")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    eval_every: PositiveInt | None = Field(None, description="evaluate on data.eval every N steps and keep the best "
                                                             "step by the family's main metric")
    save_every: PositiveInt | None = Field(None, description="save the training state every N steps, so that "
                                                             "apply --resume continues from there")
    log_with: Literal["tensorboard", "wandb"] | None = Field(
        None, description="write the loss terms and the lr per step: tensorboard (event files in the output's "
                          "runs/ folder) or wandb (offline)")

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if (self.steps is None) == (self.epochs is None):
            given = "both" if self.steps is not None else "neither"
            raise ValueError(f"give exactly one of steps and epochs (got {given}); e.g. steps: 100 or epochs: 1")
        return self

    @model_validator(mode="after")
    def _betas(self):
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas {list(self.adam_betas)} must both be in [0, 1); e.g. [0.9, 0.98]")
        return self

    def check(self, adapter, where: str) -> None:
        """What the model and this machine allow (validate time, and again when training starts): fp16 needs a GPU,
        patch dropout a family (`adapter`) whose vision output may have any number of tokens. `where` names the block
        in messages, e.g. "distill.train"."""
        from ..errors import VlmCompressError

        if self.mixed_precision == "fp16":
            import torch

            if not torch.cuda.is_available():
                raise VlmCompressError(f"{where}.mixed_precision: fp16 needs a GPU and this machine has none; "
                                       "allowed here: no, bf16")
        if self.patch_dropout and adapter is None:
            raise VlmCompressError(f"{where}.patch_dropout: {self.patch_dropout} given, but no model family is known "
                                   "to find the vision tower in; set patch_dropout: 0")
        if self.patch_dropout and not adapter.variable_vision_tokens:
            raise VlmCompressError(f"{where}.patch_dropout: {self.patch_dropout} given, but the {adapter.family} "
                                   "family needs every image token (its prompt has a fixed number of image slots); "
                                   "set patch_dropout: 0")

    def total_steps(self, train_size: int | None) -> int:
        """Optimizer steps: `steps`, or `epochs × train_size` samples in steps of `batch_size × grad_accum` (times
        the number of processes: `world_size`), rounded up."""
        if self.steps is not None:
            return self.steps
        if not train_size:
            raise ValueError("train.epochs needs data.train.size (the samples in an epoch); give data.train.size or "
                             "train.steps")
        return max(1, math.ceil(self.epochs * train_size / (self.batch_size * self.grad_accum)))

    def warmup_steps(self, total: int) -> int:
        return int(self.warmup * total) if self.warmup < 1 else min(int(self.warmup), total)

    def lr_factor(self, step: int, total: int) -> float:
        """The learning-rate multiplier at optimizer step `step` (0-based): linear warm-up to 1, then cosine to 0."""
        warm = self.warmup_steps(total)
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
