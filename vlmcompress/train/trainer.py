"""The one trainer every stage that learns shares (finetune, distill, and the learned methods to come).

A stage gives it a model, a loss function and the parameter groups to train, and calls `fit()`; no stage writes a
loop. Underneath: `accelerate.Accelerator` (device placement, `prepare`, `backward`, mixed precision, multi-process
data parallelism when launched that way), AdamW with a linear warm-up then cosine decay set per step from
`TrainConfig.lr_factor`, global gradient-norm clipping, gradient accumulation, optional gradient checkpointing and
patch dropout (`patch_dropout.py`), evaluation every `eval_every` steps keeping the best step, training state saved
every `save_every` steps (`state.py`: safetensors + JSON, resumed by `apply --resume`), and progress (step, loss and
its terms, lr, samples/s, ETA) on the shared progress display; `log_with` sends the same scalars to TensorBoard or
wandb.

Data: optimizer step `s`, micro-batch `m` of process `r` (of `W`) reads the rows `((s·G + m)·W + r)·B ...` of
`data.train` (`RunContext.rows`), so the data a step sees depends on the step alone: a resumed run reads what the
killed one would have, and 2 processes at batch B read what 1 process reads at batch 2B.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import VlmCompressError
from ..progress import Progress
from .config import TrainConfig
from .state import load_optimizer, read_state, save_state, set_rng_state


@dataclass
class LossOutput:
    """A training loss: `total` (what is minimised) and its named, already weighted terms (for logs)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ParamGroup:
    """Parameters trained at one peak learning rate (`lr`; None: the config's `lr`) and weight decay (None: the
    config's, on matrices only)."""

    name: str
    params: dict[str, nn.Parameter]
    lr: float | None = None
    weight_decay: float | None = None


LossFn = Callable[[nn.Module, list[dict]], LossOutput]


def on_model_device(model: nn.Module, batch: dict[str, Any], teacher: nn.Module | None = None) -> dict[str, Any]:
    """`batch`'s tensors on the device of `model`'s parameters, where `accelerate` placed it (a GPU when there is
    one; collate builds batches on the CPU), with the frozen `teacher` moved there too (a no-op once it is)."""
    device = next(model.parameters()).device
    if teacher is not None and next(teacher.parameters()).device != device:  # once, not every step
        teacher.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def key_biases(model: nn.Module, adapter) -> set[str]:
    """Names of the separate key-projection biases of every attention module. They cannot change any output (a
    query's logits all shift by the same q · b_k, and softmax ignores a shift), so their gradient is rounding noise,
    which Adam would turn into lr-sized random steps that differ between runs and processes: the training stages
    leave them out (a fused qkv bias is trained as a whole)."""
    prefix = {id(m): n for n, m in model.named_modules()}
    params = {n for n, _ in model.named_parameters()}
    names = {f"{prefix[id(u.module)]}.{u.k}.bias".lstrip(".") for u in adapter.attention_units(model)
             if u.k and not u.qkv}
    return names & params


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norms and embeddings-like vectors get no weight decay (as BERT / CLIP training)."""
    return p.ndim < 2 or "norm" in name or name.endswith(".bias")


class Trainer:
    """Train `param_groups` of `model` on `loss_fn(model, rows)` over the recipe's `data.train`.

    Args:
        ctx: the run context (data, working folder, processes).
        config: the stage's `train:` block.
        name: shown in progress and logs, and names the state folder.
        evaluate: `model -> {metric: value}` on `data.eval`, with `metric` the one to maximise (eval_every).
        freeze_unused: before training, freeze the given parameters that receive no gradient from the loss (pruned
            heads' leftovers, reducer choices), so they are neither decayed nor left to fail under DDP.
    """

    def __init__(self, ctx, config: TrainConfig, *, name: str, model: nn.Module, loss_fn: LossFn,
                 param_groups: list[ParamGroup], evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 metric: str | None = None, freeze_unused: bool = True, progress: bool = True):
        self.ctx, self.config, self.name, self.model, self.loss_fn = ctx, config, name, model, loss_fn
        self.groups = [g for g in param_groups if g.params]
        if not self.groups:
            raise VlmCompressError(f"{name}: nothing to train (no parameter was selected); check trainable / lora")
        self.evaluate, self.metric, self.freeze_unused = evaluate, metric, freeze_unused
        self.progress = progress
        self.train_size = ctx.train_size()
        self.total = config.total_steps(self.train_size)

    # ------------------------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train; returns what the stage report shows (steps, seconds, samples/s, losses, best step)."""
        from accelerate import Accelerator

        cfg = self.config
        cfg.check(getattr(self.ctx, "adapter", None), f"{self.name}.train")
        if cfg.log_with == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")
        log_dir = self._log_dir()
        # cpu=True on a machine without GPUs: accelerate then reads torchrun's WORLD_SIZE / RANK as MULTI_CPU (gloo);
        # without it, every launched process would train alone
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=cfg.log_with,
                                  project_dir=None if log_dir is None else str(log_dir),
                                  cpu=not torch.cuda.is_available())
        home = next(self.model.parameters()).device  # where the rest of the pipeline keeps the model
        world, rank = accelerator.num_processes, accelerator.process_index
        micro = cfg.batch_size
        rows_per_step = micro * cfg.grad_accum * world
        given = {id(p) for g in self.groups for p in g.params.values()}
        for p in self.model.parameters():  # what no group names is not trained (and not watched by DDP)
            if id(p) not in given:
                p.requires_grad_(False)
        if self.freeze_unused:
            self._freeze_unused()
        named = {n: p for g in self.groups for n, p in g.params.items() if p.requires_grad}
        optimizer = torch.optim.AdamW(self._optimizer_groups(), lr=cfg.lr, betas=tuple(cfg.adam_betas))
        if cfg.gradient_checkpointing:
            self._gradient_checkpointing(True)
        model, optimizer = accelerator.prepare(self.model, optimizer)

        state_dir, key = self._state_dir(), self._state_key()
        start, best, best_tensors = 0, None, None
        saved = read_state(state_dir, key) if state_dir is not None else None
        if saved is not None:
            with torch.no_grad():
                for n, t in saved["trainable"].items():
                    named[n].copy_(t)
            load_optimizer(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                           saved["optimizer_tensors"], saved["optimizer"])
            set_rng_state(saved["torch_rng"], saved["rng"])
            start, best, best_tensors = saved["step"], saved["best"], saved["best_tensors"]
        if cfg.log_with is not None:
            accelerator.init_trackers(self.name)

        stream = self.ctx.rows("train")
        losses: list[float] = []
        t0, samples = time.perf_counter(), 0
        self.model.train()
        with Progress(self.name, total=self.total, unit="steps", enabled=self.progress and
                      accelerator.is_main_process) as bar, self._patch_dropout():
            bar.update(completed=start)
            for step in range(start, self.total):
                factor = cfg.lr_factor(step, self.total)
                for group in optimizer.param_groups:
                    group["lr"] = group["peak_lr"] * factor
                terms_sum: dict[str, float] = {}
                loss_sum = 0.0
                for m in range(cfg.grad_accum):
                    first = ((step * cfg.grad_accum + m) * world + rank) * micro
                    rows = stream(first, micro)
                    last = m == cfg.grad_accum - 1
                    sync = contextlib.nullcontext() if last or world == 1 else accelerator.no_sync(model)
                    with sync, accelerator.autocast():
                        out = self.loss_fn(model, rows)
                        accelerator.backward(out.total / cfg.grad_accum)
                    loss_sum += float(out.total.detach()) / cfg.grad_accum
                    for k, v in out.terms.items():
                        terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                if cfg.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if world > 1:  # show and record the loss over all processes' rows, not this one's
                    loss_sum = float(accelerator.reduce(torch.tensor([loss_sum]), reduction="mean"))
                losses.append(loss_sum)
                samples += rows_per_step
                done = step + 1
                lr = optimizer.param_groups[0]["lr"]
                rate = samples / max(time.perf_counter() - t0, 1e-9)
                bar.update(completed=done, loss=loss_sum, **terms_sum, lr=lr, samples_s=round(rate, 1))
                if cfg.log_with is not None:
                    accelerator.log({"loss": loss_sum, "lr": lr} | {f"loss/{k}": v for k, v in terms_sum.items()},
                                    step=done)
                if cfg.eval_every and self.evaluate is not None and (done % cfg.eval_every == 0 or done == self.total):
                    best, best_tensors = self._evaluate(done, best, best_tensors, named, accelerator)
                if state_dir is not None and cfg.save_every and done % cfg.save_every == 0 and done < self.total \
                        and accelerator.is_main_process:
                    save_state(state_dir, step=done, key=key, trainable=named, optimizer=getattr(
                        optimizer, "optimizer", optimizer), best=best, best_tensors=best_tensors)
        seconds = time.perf_counter() - t0
        # rows each process trained on (every process has the same count: they read disjoint shards)
        local = torch.tensor([(self.total - start) * micro * cfg.grad_accum])
        per_rank = [int(x) for x in accelerator.gather(local).tolist()] if world > 1 else [int(local)]
        if cfg.log_with is not None:
            accelerator.end_training()
        if cfg.gradient_checkpointing:
            self._gradient_checkpointing(False)
        if best is not None and best["step"] != self.total and best_tensors is not None:
            with torch.no_grad():  # end at the best evaluated step
                for n, t in best_tensors.items():
                    named[n].copy_(t)
        self.model = accelerator.unwrap_model(model).to(home)  # trained on accelerate's device, handed back home
        accelerator.free_memory()
        return {"steps": self.total, "resumed_from_step": start or None, "seconds": round(seconds, 2),
                "samples_per_s": round(samples / max(seconds, 1e-9), 2) if samples else None,
                "world_size": world, "rows_per_step": rows_per_step, "rows_per_rank": per_rank, "trained_parameters": sum(
                    p.numel() for p in named.values()),
                "loss_first": round(losses[0], 5) if losses else None,
                "loss_last": round(losses[-1], 5) if losses else None,
                "loss_curve": [round(x, 5) for x in losses[:: max(1, len(losses) // 50)]],
                "best": best, "mixed_precision": cfg.mixed_precision, "patch_dropout": cfg.patch_dropout or None}

    # ------------------------------------------------------------------------------------------------------------

    def _optimizer_groups(self) -> list[dict[str, Any]]:
        cfg = self.config
        out = []
        for g in self.groups:
            lr = g.lr if g.lr is not None else cfg.lr
            params = [(n, p) for n, p in g.params.items() if p.requires_grad]
            decay = [p for n, p in params if not no_decay(n, p)]
            plain = [p for n, p in params if no_decay(n, p)]
            wd = cfg.weight_decay if g.weight_decay is None else g.weight_decay
            for ps, w in ((decay, wd), (plain, 0.0)):
                if ps:
                    out.append({"params": ps, "weight_decay": w, "peak_lr": lr, "lr": lr, "name": g.name})
        return out

    def _patch_dropout(self):
        """`train.patch_dropout` on the model's vision tower, for the training forwards only (patch_dropout.py)."""
        from .patch_dropout import patch_dropout

        rate = self.config.patch_dropout
        if not rate:
            return patch_dropout(self.model, None, 0.0)
        if getattr(self.ctx, "compression", {}).get("token_reduction"):
            raise VlmCompressError(f"{self.name}.train.patch_dropout: token reduction runs before it and expects "
                                   "every patch token; set patch_dropout: 0, or move token_reduce after this stage")
        return patch_dropout(self.model, self.ctx.adapter.vision_tower(self.model), rate)

    def _freeze_unused(self) -> None:
        """One eval-mode forward / backward on the first micro-batch (no dropout: no random numbers drawn); the
        given parameters without a gradient are frozen."""
        rows = self.ctx.rows("train")(0, min(self.config.batch_size, 8))
        was_training = self.model.training
        self.model.eval()
        out = self.loss_fn(self.model, rows)
        out.total.backward()
        for g in self.groups:
            for p in g.params.values():
                if p.grad is None:
                    p.requires_grad_(False)
                p.grad = None
        self.model.train(was_training)

    def _evaluate(self, step, best, best_tensors, named, accelerator):
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate(accelerator.unwrap_model(self.model))
        self.model.train()
        value = metrics.get(self.metric) if metrics else None
        if value is not None and (best is None or value > best["value"]):
            best = {"step": step, "metric": self.metric, "value": value}
            best_tensors = {n: p.detach().clone() for n, p in named.items()}
        if value is not None and self.config.log_with is not None:
            accelerator.log({f"eval/{self.metric}": value}, step=step)
        return best, best_tensors

    def _gradient_checkpointing(self, on: bool) -> None:
        if not hasattr(self.model, "gradient_checkpointing_enable"):
            raise VlmCompressError(f"train.gradient_checkpointing: {type(self.model).__name__} does not support it; "
                                   "set gradient_checkpointing: false")
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            if on:
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.activation_checkpointing_disable()
        elif on:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_disable()

    def _state_dir(self) -> Path | None:
        work = getattr(self.ctx, "work", None)
        return None if work is None else Path(work) / f"stage-{self.ctx.stage_index + 1:02d}-training"

    def _state_key(self) -> str:
        recipe = self.ctx.recipe
        return recipe.prefix_hash(self.ctx.stage_index + 1) if hasattr(recipe, "prefix_hash") else "in-memory"

    def _log_dir(self) -> Path | None:
        if self.config.log_with is None:
            return None
        work = getattr(self.ctx, "work", None)
        base = Path(work) if work is not None else Path(os.environ.get("TMPDIR", "/tmp")) / "vlmcompress-runs"
        folder = base / "runs"
        folder.mkdir(parents=True, exist_ok=True)
        self.ctx.artifacts["runs"] = folder  # copied into the output folder, as transformers' Trainer's runs/
        return folder
