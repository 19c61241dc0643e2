"""`distill`: a student with fewer layers per component, initialised from chosen teacher layers and trained against
the frozen teacher (EfficientVLM's first stage, methods.md §6b) on the shared trainer.

Loss: `task` × the family's task loss + `logits` × KL to the teacher's logits at `temperature` + `hidden` × MSE of
hidden states through the layer map + `attention` × MSE of attention maps (eager attention, only when its weight is
> 0) + `embedding` × squared distance of the unit embeddings (dual encoders). Hidden states and attention maps are
read by forward hooks on the layer stacks, so every family works alike.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

from pydantic import Field, model_validator

from ...errors import VlmCompressError
from ...schema import Component, StrictModel
from ...train import TrainConfig
from ..base import RunContext, Stage, StageConfig, StageReport, count_params
from .student import attention_map, evenly_spaced, hidden_map, keep_layers


class DistillLoss(StrictModel):
    """Weights of the distillation loss terms."""

    task: float = Field(1.0, ge=0, description="the family's task loss")
    logits: float = Field(1.0, ge=0, description="KL divergence to the teacher's logits")
    hidden: float = Field(1.0, ge=0, description="MSE of hidden states through the layer map")
    attention: float = Field(0.0, ge=0, description="MSE of attention maps (runs eager attention)")
    embedding: float = Field(0.0, ge=0, description="squared distance of the unit image / text embeddings to the "
                                                    "teacher's (CLIP-KD feature distillation; clip and siglip)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the logit term")

    @model_validator(mode="after")
    def _something(self):
        if not (self.task or self.logits or self.hidden or self.attention or self.embedding):
            raise ValueError("every loss weight is 0; give at least one of task, logits, hidden, attention, "
                             "embedding > 0")
        return self


class DistillConfig(StageConfig):
    """A smaller student (fewer layers per component) distilled from the teacher."""

    method: Literal["distill"]
    student: dict[Component, list[int] | int] = Field(
        description="layers per component: a list of teacher layer indices to keep, or a count (evenly spaced), "
                    "e.g. {vision: [0, 2], text: 1}")
    layer_map: dict[Component, list[int]] = Field(
        default_factory=dict, description="per component, the teacher hidden-state index (0 = embeddings) each "
                                          "student hidden state matches; default: i · L_teacher / L_student")
    loss: DistillLoss = Field(default_factory=DistillLoss)
    lr_scale: dict[Component, float] = Field(
        default_factory=dict, description="per component, a multiplier of train.lr for its parameters (e.g. {text: "
                                          "3}: the tower that loses most layers has most to relearn); default 1")
    train: TrainConfig

    @model_validator(mode="after")
    def _student(self):
        if not self.student:
            raise ValueError("student names no component; e.g. student: {vision: 2}")
        bad = {c: v for c, v in self.lr_scale.items() if not v > 0}
        if bad:
            raise ValueError(f"lr_scale {bad} must be > 0 (a multiplier of train.lr); e.g. lr_scale: {{text: 3}}")
        return self


class DistillStage(Stage):
    """Shrink the layer stacks to the student's layers, then train the student against the frozen teacher."""

    requires_data = True
    trains = True
    needs_teacher = True
    changes_architecture = True

    def keep(self, model, adapter) -> dict[str, list[int]]:
        """Teacher layer indices kept per component; raises on a bad selection."""
        stacks = adapter.layer_stacks(model)
        out = {}
        for component, choice in self.config.student.items():
            if component not in stacks:
                raise VlmCompressError(f"distill.student.{component}: the {adapter.family} family has no {component} "
                                       f"layers to shrink; allowed: {', '.join(stacks) or 'none'}")
            n = len(model.get_submodule(stacks[component].layers_path))
            if isinstance(choice, int):
                if not 1 <= choice <= n:
                    raise VlmCompressError(f"distill.student.{component}: {choice} layers asked, the teacher has {n}; "
                                           f"allowed: 1 … {n}")
                out[component] = evenly_spaced(n, choice)
                continue
            if not choice or len(choice) > n:
                raise VlmCompressError(f"distill.student.{component}: {len(choice)} layers given, the teacher has "
                                       f"{n}; give 1 … {n} indices")
            if any(not 0 <= i < n for i in choice) or len(set(choice)) != len(choice) or choice != sorted(choice):
                raise VlmCompressError(f"distill.student.{component}: {choice} must be distinct ascending indices in "
                                       f"0 … {n - 1} (the teacher has {n} layers)")
            out[component] = list(choice)
        return out

    def maps(self, model, adapter, keep: dict[str, list[int]]) -> dict[str, list[int]]:
        stacks = adapter.layer_stacks(model)
        out = {}
        for component, kept in keep.items():
            n = len(model.get_submodule(stacks[component].layers_path))
            mapping = self.config.layer_map.get(component, hidden_map(n, len(kept)))
            if len(mapping) != len(kept) + 1 or any(not 0 <= t <= n for t in mapping):
                raise VlmCompressError(f"distill.layer_map.{component}: {mapping} must give {len(kept) + 1} teacher "
                                       f"hidden-state indices in 0 … {n} (embeddings, then each student layer)")
            out[component] = mapping
        return out

    def check(self, model, adapter) -> None:
        keep = self.keep(model, adapter)
        self.maps(model, adapter, keep)
        self._check_reloads(model, adapter, keep)
        self.config.train.check(adapter, "distill.train")
        if self.config.train.patch_dropout and "vision" in keep and (self.config.loss.hidden or
                                                                     self.config.loss.attention):
            raise VlmCompressError("distill.train.patch_dropout: the student's vision hidden states and attention "
                                   "maps would have fewer tokens than the teacher's; set loss.hidden and "
                                   "loss.attention to 0, or patch_dropout: 0")
        for component in self.config.lr_scale:
            if component not in adapter.component_paths:
                raise VlmCompressError(f"distill.lr_scale.{component}: the {adapter.family} family has no {component}; "
                                       f"allowed: {', '.join(adapter.component_paths)}")
        for component in self.config.layer_map:
            if component not in keep:
                raise VlmCompressError(f"distill.layer_map.{component}: {component} is not in student; add it there")
        if self.config.loss.embedding > 0 and not adapter.shared_embeddings:
            raise VlmCompressError(f"distill.loss.embedding: the {adapter.family} family has no shared image-text "
                                   "embedding space to distil (clip and siglip have); set embedding: 0")
        if self.config.loss.attention > 0:
            for component in keep:
                stack = adapter.layer_stacks(model)[component]
                if not hasattr(model.get_submodule(stack.layers_path)[0], "self_attn"):
                    raise VlmCompressError(f"distill.loss.attention: the {component} layers of {adapter.family} have "
                                           "no self_attn module to read attention maps from; set attention: 0")

    def _check_reloads(self, model, adapter, keep: dict[str, list[int]]) -> None:
        """The student, as its config describes it, must have the kept layers' parameters: build both on the meta
        device and compare (BLIP-2's Q-Former gives cross-attention to every `cross_attention_frequency`-th layer
        by position, so keeping a layer at a position of the other kind would not reload)."""
        import copy

        import torch

        with torch.device("meta"):
            student = copy.deepcopy(model).to("meta")
            for component, kept in keep.items():
                keep_layers(student, adapter.layer_stacks(student)[component], kept)
            fresh = type(model)(copy.deepcopy(student.config))
        want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in student.state_dict().items()}
        if want != got:
            bad = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
            raise VlmCompressError(f"distill.student: layers {keep} give a student that its own config would not "
                                   f"rebuild ({', '.join(bad[:2])} differ); pick layers at positions of the same kind "
                                   "(e.g. BLIP-2's Q-Former alternates cross-attention layers)")

    def plan(self, model, adapter) -> dict[str, Any]:
        keep = self.keep(model, adapter)
        stacks = adapter.layer_stacks(model)
        out = {"student": {c: f"{len(k)} of {len(model.get_submodule(stacks[c].layers_path))} layers: {k}"
                           for c, k in keep.items()},
               # as text: a two-entry map is a list of indices, not a "before → after" pair
               "layer_map": {c: f"teacher hidden states {m}" for c, m in self.maps(model, adapter, keep).items()},
               "loss": self.config.loss.model_dump(),
               "steps": self.config.train.steps, "epochs": self.config.train.epochs}
        if self.config.lr_scale:
            out["lr"] = {"student": self.config.train.lr} | {c: self.config.train.lr * k
                                                             for c, k in self.config.lr_scale.items()}
        kept_params = 0
        for c, k in keep.items():
            layers = model.get_submodule(stacks[c].layers_path)
            dropped = [i for i in range(len(layers)) if i not in k]
            kept_params += sum(p.numel() for i in dropped for p in layers[i].parameters())
        out["params"] = {"total": [count_params(model), count_params(model) - kept_params]}
        return out

    def run(self, ctx: RunContext) -> StageReport:
        from ...train.trainer import ParamGroup, Trainer, key_biases

        if any(ctx.compression.get(k) for k in ("param_shapes", "token_reduction", "quantization")):
            raise VlmCompressError("distill changes the layer counts, so it must come before structured_prune, "
                                   "token_reduce and quantize; move it to the start of the recipe")
        if ctx.processor is None:
            raise VlmCompressError("distill builds its training batches with the model's processor, and this model "
                                   "has none; use a model folder with its processor files")
        model, adapter = ctx.model, ctx.adapter
        params_before = count_params(model)
        keep = self.keep(model, adapter)
        maps = self.maps(model, adapter, keep)
        stacks = adapter.layer_stacks(model)
        teacher_depth = {c: len(model.get_submodule(stacks[c].layers_path)) for c in keep}
        for component, kept in keep.items():
            keep_layers(model, stacks[component], kept)
        attention_maps = {c: attention_map(teacher_depth[c], len(k)) for c, k in keep.items()}
        eager = self.config.loss.attention > 0
        previous = _set_eager(model, ctx.teacher) if eager else None
        try:
            loss_fn = self._loss_fn(ctx, stacks, keep, maps, attention_maps)
            groups = self._param_groups(model, adapter, key_biases(model, adapter))
            trainer = Trainer(ctx, self.config.train, name="distill", model=model, loss_fn=loss_fn,
                              param_groups=[ParamGroup(name, params, lr=lr) for name, (params, lr) in groups.items()],
                              progress=ctx.progress)
            details = trainer.fit()
        finally:
            if previous is not None:
                _restore_attention((model, ctx.teacher), previous)
        for p in model.parameters():
            p.requires_grad_(True)
        details |= {"student": {c: {"teacher_layers": k, "layers": len(k), "of": teacher_depth[c]}
                                for c, k in keep.items()},
                    "layer_map": maps, "attention_map": attention_maps if eager else None,
                    "lr_scale": dict(self.config.lr_scale),
                    "loss": self.config.loss.model_dump()}
        return StageReport(method="distill", matched=[stacks[c].layers_path for c in keep],
                           params_before=params_before, params_after=count_params(model), details=details)

    def _param_groups(self, model, adapter, frozen: set[str]) -> dict[str, tuple[dict, float | None]]:
        """`{name: (parameters, peak lr)}`: each component of `lr_scale` at its multiple of train.lr, the rest
        ("student") at train.lr; `frozen` names are left out."""
        prefixes = {c: adapter.component_paths[c] + "." for c in self.config.lr_scale}
        groups: dict[str, dict] = {"student": {}} | {c: {} for c in prefixes}
        for n, p in model.named_parameters():
            if n not in frozen:
                groups[next((c for c, pre in prefixes.items() if n.startswith(pre)), "student")][n] = p
        lr = self.config.train.lr
        return {name: (params, None if name == "student" else lr * self.config.lr_scale[name])
                for name, params in groups.items()}

    def _loss_fn(self, ctx, stacks, keep, maps, attention_maps):
        from ...train.losses import attention_mse, embedding_distance, hidden_mse, logit_distillation
        from ...train.trainer import LossOutput, on_model_device

        adapter, processor, w = ctx.adapter, ctx.processor, self.config.loss
        want_hidden, want_attention = w.hidden > 0, w.attention > 0
        need_teacher = w.logits > 0 or w.embedding > 0 or want_hidden or want_attention

        def loss(model, rows):
            import torch

            batch = on_model_device(model, adapter.collate(processor, rows), ctx.teacher if need_teacher else None)
            with _capture(_unwrap(model), stacks, keep, want_hidden, want_attention) as got:
                out = adapter.train_outputs(model, batch)
            if need_teacher:
                with torch.no_grad(), _capture(ctx.teacher, stacks, keep, want_hidden, want_attention) as want:
                    teacher = adapter.train_outputs(ctx.teacher, batch)
            terms: dict[str, torch.Tensor] = {}
            if w.task > 0:
                terms["task"] = w.task * out.loss
            if w.logits > 0:
                terms["logits"] = w.logits * logit_distillation(out.logits, teacher.logits, w.temperature)
            if w.embedding > 0:
                terms["embedding"] = w.embedding * embedding_distance(out.embeddings, teacher.embeddings)
            if want_hidden:
                terms["hidden"] = w.hidden * sum(hidden_mse(got[c]["hidden"], want[c]["hidden"], maps[c])
                                                 for c in keep) / len(keep)
            if want_attention:
                terms["attention"] = w.attention * sum(
                    attention_mse(got[c]["attention"], want[c]["attention"], attention_maps[c]) for c in keep
                ) / len(keep)
            return LossOutput(sum(terms.values()), terms)

        return loss


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


@contextlib.contextmanager
def _capture(model, stacks, components, hidden: bool, attention: bool):
    """`{component: {"hidden": [embeddings' output, layer outputs...], "attention": [per layer]}}` of one forward,
    from forward hooks on every layer (and its `self_attn`) of the components' stacks. The first forward through a
    stack is the one recorded (BLIP's ITM pass runs the text encoder again)."""
    got: dict[str, dict[str, list]] = {c: {"hidden": [], "attention": []} for c in components}
    handles = []
    for component in components:
        layers = model.get_submodule(stacks[component].layers_path)
        record = got[component]
        done = {"layers": 0}

        def first_input(module, args, kwargs, record=record, done=done):
            if hidden and done["layers"] == 0 and not record["hidden"]:
                record["hidden"].append(args[0] if args else kwargs["hidden_states"])

        def output(module, args, out, record=record, done=done, count=len(layers)):
            if done["layers"] < count:
                done["layers"] += 1
                if hidden:
                    record["hidden"].append(out[0] if isinstance(out, (tuple, list)) else out)

        def attn(module, args, out, record=record, count=len(layers)):
            if len(record["attention"]) < count and isinstance(out, tuple) and out[1] is not None:
                record["attention"].append(out[1])

        handles.append(layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
        handles += [layer.register_forward_hook(output) for layer in layers]
        if attention:
            handles += [layer.self_attn.register_forward_hook(attn) for layer in layers]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def _set_eager(*models) -> list[str]:
    previous = [m.config._attn_implementation for m in models]
    for m in models:
        m.set_attn_implementation("eager")
    return previous


def _restore_attention(models, previous: list[str]) -> None:
    for m, impl in zip(models, previous):
        m.set_attn_implementation(impl)
