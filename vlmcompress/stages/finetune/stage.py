"""`finetune`: recovery training of the compressed model on its family's task loss, optionally with distillation of
the teacher's logits, on all (or `trainable:`-selected) parameters or on LoRA adapters that are merged before
saving. Token reduction stays active while it trains, so the model learns to work with its merged tokens.

The loop is the shared trainer (`vlmcompress.train`): this stage gives it the model, the loss and the parameters.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ...errors import VlmCompressError
from ...schema import StrictModel
from ...selectors import check_selectors, matches
from ...train import TrainConfig
from ..base import RunContext, Stage, StageConfig, StageReport, count_params

EVAL_METRICS = {"clip": "recall@1", "siglip": "recall@1", "llava": "vqa_accuracy"}


class FinetuneLoss(StrictModel):
    """Weights of the loss terms: the family's task loss and the KL to the teacher's logits at `temperature`."""

    task: float = Field(1.0, ge=0, description="weight of the family's task loss")
    logits: float = Field(0.0, ge=0, description="weight of the KL divergence to the teacher's logits")
    temperature: float = Field(2.0, gt=0, description="softmax temperature of the logit distillation")

    @model_validator(mode="after")
    def _something(self):
        if self.task == 0 and self.logits == 0:
            raise ValueError("every loss weight is 0; give task > 0 or logits > 0")
        return self


class LoraConfig(StrictModel):
    """LoRA adapters on the selected linear layers (PEFT), merged into the weights before saving."""

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator (the update is alpha / r · B A)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    targets: list[str] = Field(min_length=1, description="linear layers to adapt: module names or re: patterns, "
                                                         "e.g. ['re:.*self_attn\\.(q|v)_proj', 're:.*mlp\\.fc.']")


class FinetuneConfig(StageConfig):
    """Recovery fine-tuning (full or LoRA) on the task loss, optionally distilling the teacher's logits."""

    method: Literal["finetune"]
    train: TrainConfig
    teacher: Literal["original", "none"] = Field("none", description="original: the source model before the first "
                                                                    "stage, for loss.logits")
    loss: FinetuneLoss = Field(default_factory=FinetuneLoss)
    lora: LoraConfig | None = None
    trainable: list[str] | None = Field(None, description="without lora: parameters to train (names or re: patterns "
                                                          "of parameters or their modules); default: all")
    save_adapter: bool = Field(False, description="with lora: also write the adapter folder (adapter/) that "
                                                  "PeftModel.from_pretrained loads on the model before this stage")

    @model_validator(mode="after")
    def _consistent(self):
        if self.loss.logits > 0 and self.teacher == "none":
            raise ValueError("loss.logits > 0 distils the teacher's logits: set teacher: original")
        if self.teacher == "original" and self.loss.logits == 0:
            raise ValueError("teacher: original is used by loss.logits only; set loss.logits > 0 or teacher: none")
        if self.lora is not None and self.trainable is not None:
            raise ValueError("give lora (adapters) or trainable (parameters of the model), not both")
        if self.save_adapter and self.lora is None:
            raise ValueError("save_adapter writes the LoRA adapter: add lora: {targets: [...]}")
        return self


    def card_lines(self, details: dict[str, Any]) -> list[str]:
        """The model card's section on the recovery training (from the stage's report details)."""
        mode = (f"LoRA (r={self.lora.r}, alpha={self.lora.alpha}) on {len(self.lora.targets)} target pattern(s), "
                "merged into the weights" if self.lora else "all selected parameters")
        loss = f"task loss × {self.loss.task}"
        if self.loss.logits:
            loss += f" + KL to the teacher's logits × {self.loss.logits} (temperature {self.loss.temperature})"
        lines = ["", "## Recovery fine-tuning", "",
                 f"{details.get('steps')} steps of {details.get('rows_per_step')} samples on `data.train` "
                 f"({mode}; {details.get('trained_parameters'):,} parameters trained); loss: {loss}; "
                 f"{details.get('seconds')} s at {details.get('samples_per_s')} samples/s."]
        if details.get("best"):
            best = details["best"]
            lines.append(f"Kept the best evaluated step: {best['step']} ({best['metric']} {best['value']}).")
        if details.get("adapter"):
            lines.append("`adapter/` holds the LoRA adapter for `PeftModel.from_pretrained` on the model before "
                         "this stage.")
        return lines + [""]


class FinetuneStage(Stage):
    """Train the compressed model (all / selected parameters, or merged LoRA adapters) on the task loss."""

    requires_data = True
    trains = True

    def __init__(self, config: FinetuneConfig):
        super().__init__(config)
        # an instance flag: the teacher is loaded only when this configuration distils it
        self.needs_teacher = config.teacher == "original"

    def check(self, model, adapter) -> None:
        cfg = self.config
        cfg.train.check(adapter, "finetune.train")
        if cfg.lora is not None:
            linear = [n for n, m in model.named_modules() if type(m).__name__ == "Linear"]
            check_selectors(cfg.lora.targets, linear, "finetune.lora.targets")
        if cfg.trainable is not None:
            names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules() if n]
            check_selectors(cfg.trainable, names, "finetune.trainable")
        if cfg.train.eval_every is not None and adapter.family not in EVAL_METRICS:
            raise VlmCompressError(f"finetune.train.eval_every: the {adapter.family} family has no accuracy metric "
                                   f"in apply yet (families: {', '.join(EVAL_METRICS)}); remove eval_every")

    def plan(self, model, adapter) -> dict[str, Any]:
        cfg = self.config
        selected = self._selected(model)
        out = {"mode": "lora" if cfg.lora else "full", "teacher": cfg.teacher,
               "loss": cfg.loss.model_dump(), "steps": cfg.train.steps, "epochs": cfg.train.epochs,
               "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum}
        if cfg.lora is None:
            out["trainable_parameters"] = sum(p.numel() for n, p in model.named_parameters() if n in selected)
        else:
            out["lora_targets"] = len(selected)
        return out

    def _selected(self, model) -> set[str]:
        """LoRA: the target module names; otherwise the names of the parameters to train."""
        cfg = self.config
        if cfg.lora is not None:
            return {n for n, m in model.named_modules()
                    if type(m).__name__ == "Linear" and any(matches(s, n) for s in cfg.lora.targets)}
        if cfg.trainable is None:
            return {n for n, _ in model.named_parameters()}
        return {n for n, _ in model.named_parameters()
                if any(matches(s, n) or matches(s, n.rpartition(".")[0]) for s in cfg.trainable)}

    def run(self, ctx: RunContext) -> StageReport:
        from ...train.trainer import ParamGroup, Trainer, key_biases

        cfg = self.config
        if ctx.processor is None:
            raise VlmCompressError("finetune builds its training batches with the model's processor (tokenizer + "
                                   "image processor), and this model has none; use a model folder with its "
                                   "processor files")
        model = ctx.model
        params_before = count_params(model)
        selected = self._selected(model)
        for p in model.parameters():
            p.requires_grad_(False)
        peft_model = None
        if cfg.lora is not None:
            from ...integrations import peft_lora

            peft_model = peft_lora.add_lora(model, sorted(selected), cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
            train_model = peft_model
            groups = [ParamGroup("lora", peft_lora.lora_parameters(peft_model), lr=cfg.train.new_module_lr)]
        else:
            train_model = model
            frozen = key_biases(model, ctx.adapter)
            named = {n: p for n, p in model.named_parameters() if n in selected and n not in frozen}
            for p in named.values():
                p.requires_grad_(True)
            groups = [ParamGroup("model", named)]
        loss_fn = self._loss_fn(ctx)
        evaluate, metric = self._evaluator(ctx)
        trainer = Trainer(ctx, cfg.train, name="finetune", model=train_model, loss_fn=loss_fn, param_groups=groups,
                          evaluate=evaluate, metric=metric, progress=ctx.progress)
        details = trainer.fit()
        if peft_model is not None:
            details |= self._finish_lora(ctx, peft_model)
        for p in ctx.model.parameters():
            p.requires_grad_(True)
        details |= {"mode": "lora" if cfg.lora else "full", "teacher": cfg.teacher, "loss": cfg.loss.model_dump()}
        return StageReport(method="finetune", matched=sorted(selected) if cfg.lora else [],
                           params_before=params_before, params_after=count_params(ctx.model), details=details)

    def _finish_lora(self, ctx: RunContext, peft_model) -> dict[str, Any]:
        """Write the adapter folder when asked, merge, and check that no PEFT module is left."""
        import tempfile
        from pathlib import Path

        from ...integrations import peft_lora

        out: dict[str, Any] = {"lora": self.config.lora.model_dump()}
        if self.config.save_adapter:
            folder = Path(tempfile.mkdtemp(prefix="vlmcompress-adapter-")) / "adapter"
            peft_lora.save_adapter(peft_model, folder)
            ctx.artifacts["adapter"] = folder
            out["adapter"] = "adapter/ (PeftModel.from_pretrained on the model before this stage)"
        merged = peft_lora.merge(peft_model)
        if merged is not ctx.model:
            ctx.model = merged
        left = peft_lora.peft_modules(ctx.model)
        if left:
            raise VlmCompressError(f"finetune: merging LoRA left PEFT modules ({', '.join(left[:3])}); please report")
        return out

    def _loss_fn(self, ctx: RunContext):
        from ...train.losses import logit_distillation
        from ...train.trainer import LossOutput, on_model_device

        adapter, processor, weights = ctx.adapter, ctx.processor, self.config.loss

        def loss(model, rows: list[dict]) -> LossOutput:
            import torch

            batch = on_model_device(model, adapter.collate(processor, rows),
                                    ctx.teacher if weights.logits > 0 else None)
            out = adapter.train_outputs(model, batch)
            terms = {}
            total = 0.0
            if weights.task > 0:
                terms["task"] = weights.task * out.loss
                total = total + terms["task"]
            if weights.logits > 0:
                with torch.no_grad():
                    teacher = adapter.train_outputs(ctx.teacher, batch).logits
                terms["logits"] = weights.logits * logit_distillation(out.logits, teacher, weights.temperature)
                total = total + terms["logits"]
            return LossOutput(total, terms)

        return loss

    def _evaluator(self, ctx: RunContext):
        if self.config.train.eval_every is None:
            return None, None
        from ...accuracy import eval_rows, measure

        family = ctx.adapter.family
        rows = eval_rows(ctx.recipe, ctx.model)
        if rows is None:
            raise VlmCompressError("finetune.train.eval_every evaluates on data.eval, which the recipe does not have; "
                                   "add data.eval or remove eval_every")
        if family == "llava":
            from ...evaluate import evaluate_vqa

            return (lambda model: evaluate_vqa(model, ctx.processor, rows)), EVAL_METRICS[family]
        return (lambda model: measure(model, ctx.processor, family, rows)), EVAL_METRICS[family]
