"""The `structured_prune` stage and the base of every importance's config: remove attention heads and MLP neurons for
real (smaller tensors).

An importance is one file of this package holding a `StructuredPruneConfig` subclass (its `importance: Literal`,
its per-element score, whether it reads data and what it computes first), registered by `register_importance`;
this file names none. With `magnitude` (the default), importance is the L2 magnitude of each head's (or neuron's) weights across every projection it is coupled to,
normalised by the mean of its layer so that one global ranking per component can remove more from the layers that
matter less (non-uniform per-layer widths). At least one head and one neuron stay in every layer. The residual width
never changes, so projection dimensions of dual encoders, the vision → projector → LLM interface and fused `qkv`
layouts stay consistent; grouped-query attention is pruned a key/value group at a time.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from ...adapters import AttentionUnit, MlpUnit, get_submodule
from ...adapters.base import encoder_gflops
from ...errors import VlmCompressError
from ...integrations import torch_pruning as tpi
from ...modeling.shapes import set_dotted_attr
from ...selectors import check_selectors, matches
from ..base import (COMPONENTS, Component, RunContext, Stage, StageConfig, StageReport, UnknownChoiceError,
                    count_params)

Ratio = Annotated[float, Field(ge=0.0, lt=1.0)]


IMPORTANCES: dict[str, type[StructuredPruneConfig]] = {}


class StructuredPruneConfig(StageConfig):
    """Remove a fraction of attention heads and MLP neurons by importance."""

    method: Literal["structured_prune"]
    importance: str = Field(
        "magnitude", description="magnitude: weight norms; taylor: |w · gradient| of the task loss on data.train")
    # shared by the importances that read data (taylor): how much of data.train they see
    calibration_batches: int = Field(4, ge=1, description="taylor: batches of data.train used for the gradients")
    calibration_batch_size: int = Field(32, ge=1)
    ratio: Ratio | dict[Component, Ratio] = Field(
        0.5, description="fraction removed: one float for every component, or per component {vision: 0.5, text: 0.3}"
    )
    targets: list[Literal["heads", "mlp"]] = Field(["heads", "mlp"], min_length=1)
    ignore: list[str] = Field([], description="module names (exact or 're:' regex) left untouched")
    global_ranking: bool = Field(True, description="rank across the layers of a component (non-uniform widths)")

    @classmethod
    def config_class(cls, data: Any) -> type[StructuredPruneConfig]:
        """The registered class for `data["importance"]` (`magnitude` when absent)."""
        name = data.get("importance", "magnitude") if isinstance(data, dict) else "magnitude"
        if name not in IMPORTANCES:
            raise UnknownChoiceError("importance", name, list(IMPORTANCES))
        return IMPORTANCES[name]

    @classmethod
    def choices(cls) -> tuple[str, dict[str, type[StageConfig]]]:
        return "importance", dict(IMPORTANCES)

    def needs_data(self) -> bool:
        """Whether this importance reads the recipe's data.train."""
        return False

    def prepare(self, ctx: RunContext) -> None:
        """What the importance computes on the model before the scores are read (Taylor: gradients)."""

    def element_score(self, p: torch.Tensor) -> torch.Tensor:
        """Per-element importance of a weight or bias `p` (same shape)."""
        raise NotImplementedError


def register_importance(config_cls: type[StructuredPruneConfig]) -> type[StructuredPruneConfig]:
    """Register a pruning importance (a `StructuredPruneConfig` subclass whose `importance` is a one-value
    `Literal`); a name is taken once. Usable as a decorator."""
    import typing

    if not (isinstance(config_cls, type) and issubclass(config_cls, StructuredPruneConfig)):
        raise VlmCompressError(f"register_importance takes a StructuredPruneConfig subclass, got {config_cls!r}")
    names = typing.get_args(config_cls.model_fields["importance"].annotation)
    if len(names) != 1:
        raise VlmCompressError(f"{config_cls.__name__}.importance must be a Literal of one name")
    known = IMPORTANCES.get(names[0])
    if known is not None and known.__qualname__ != config_cls.__qualname__:
        raise VlmCompressError(f"pruning importance {names[0]!r} is already registered by {known.__name__}")
    IMPORTANCES[names[0]] = config_cls
    return config_cls


def elementwise_score(p: torch.Tensor, kind: str | StructuredPruneConfig) -> torch.Tensor:
    """Per-element importance of a weight under importance `kind` (a registered name or a config)."""
    config = kind if isinstance(kind, StructuredPruneConfig) else IMPORTANCES[kind].model_construct(importance=kind)
    return config.element_score(p)


def _rows_score(linear: torch.nn.Linear, idxs: list[int], kind) -> torch.Tensor:
    s = elementwise_score(linear.weight, kind)[idxs].sum()
    return s + (elementwise_score(linear.bias, kind)[idxs].sum() if linear.bias is not None else 0.0)


def _head_groups(unit: AttentionUnit) -> list[dict[str, list[int]]]:
    """Channels of every prunable group of `unit`: one head, or one key/value head with its query heads."""
    per_group = unit.num_heads // unit.num_kv_heads
    groups = []
    for g in range(unit.num_kv_heads):
        q_heads = list(range(g * per_group, (g + 1) * per_group))
        groups.append({"q_heads": q_heads, "kv_heads": [g]})
    return groups


def _group_channels(unit: AttentionUnit, group: dict[str, list[int]]) -> dict[str, list[int]]:
    d = unit.head_dim
    if unit.qkv:
        return {"qkv": tpi.head_channels(group["q_heads"], d, chunks=3, heads_per_chunk=unit.num_heads),
                "out": tpi.head_channels(group["q_heads"], d)}
    return {"q": tpi.head_channels(group["q_heads"], d), "k": tpi.head_channels(group["kv_heads"], d),
            "v": tpi.head_channels(group["kv_heads"], d), "out": tpi.head_channels(group["q_heads"], d)}


@torch.no_grad()
def head_importance(unit: AttentionUnit, kind: str | StructuredPruneConfig = "magnitude") -> torch.Tensor:
    """`[num_kv_heads]` importance of each head group, summed over every coupled projection: squared L2 norm
    (magnitude) or `Σ |w · grad|` (taylor)."""
    scores = []
    for group in _head_groups(unit):
        ch = _group_channels(unit, group)
        out = get_submodule(unit.module, unit.out)
        s = elementwise_score(out.weight, kind)[:, ch["out"]].sum()
        for key in ("qkv", "q", "k", "v"):
            if key in ch:
                s = s + _rows_score(get_submodule(unit.module, getattr(unit, key)), ch[key], kind)
        scores.append(s)
    return torch.stack(scores).float()


@torch.no_grad()
def neuron_importance(unit: MlpUnit, kind: str | StructuredPruneConfig = "magnitude") -> torch.Tensor:
    """`[width]` importance of each neuron: its rows in the up projections and column in the down projection."""
    down = get_submodule(unit.module, unit.down)
    s = elementwise_score(down.weight, kind).sum(dim=0)
    for name in unit.up:
        up = get_submodule(unit.module, name)
        s = s + elementwise_score(up.weight, kind).sum(dim=1)
        if up.bias is not None:
            s = s + elementwise_score(up.bias, kind)
    return s.float()


def choose_removals(scores: dict[str, torch.Tensor], ratio: float, global_ranking: bool) -> dict[str, list[int]]:
    """Indices to remove per unit so that `ratio` of all groups go, keeping at least one per unit.

    Scores are divided by their unit's mean first, so one ranking across layers compares like with like.
    """
    normalised = {k: v / v.mean().clamp_min(1e-12) for k, v in scores.items()}
    removals: dict[str, list[int]] = {k: [] for k in scores}
    if global_ranking:
        total = sum(len(v) for v in scores.values())
        budget = int(round(ratio * total))
        flat = sorted((float(s), k, i) for k, v in normalised.items() for i, s in enumerate(v))
        for _, key, idx in flat:
            if budget == 0:
                break
            if len(scores[key]) - len(removals[key]) > 1:
                removals[key].append(idx)
                budget -= 1
    else:
        for key, v in normalised.items():
            n = min(int(round(ratio * len(v))), len(v) - 1)
            removals[key] = v.argsort()[:n].tolist()
    return removals


def remove_heads(unit: AttentionUnit, groups_to_remove: list[int]) -> dict[str, Any]:
    """Cut the channels of the given head groups; returns the module attributes that changed."""
    groups = _head_groups(unit)
    chosen = [groups[g] for g in groups_to_remove]
    merged = {"q_heads": sorted(h for g in chosen for h in g["q_heads"]),
              "kv_heads": sorted(h for g in chosen for h in g["kv_heads"])}
    ch = _group_channels(unit, merged)
    tpi.prune_in_channels(get_submodule(unit.module, unit.out), ch["out"])
    for key in ("qkv", "q", "k", "v"):
        if key in ch:
            tpi.prune_out_channels(get_submodule(unit.module, getattr(unit, key)), ch[key])
    heads = unit.num_heads - len(merged["q_heads"])
    kv_heads = unit.num_kv_heads - len(merged["kv_heads"])
    attrs = {a: heads for a in unit.head_attrs} | {a: kv_heads for a in unit.kv_head_attrs}
    attrs |= {a: heads * unit.head_dim for a in unit.width_attrs}
    for attr, value in attrs.items():
        set_dotted_attr(unit.module, attr, value)
    return attrs


def remove_neurons(unit: MlpUnit, idxs: list[int]) -> dict[str, Any]:
    for name in unit.up:
        tpi.prune_out_channels(get_submodule(unit.module, name), idxs)
    down = get_submodule(unit.module, unit.down)
    tpi.prune_in_channels(down, idxs)
    attrs = {a: down.in_features for a in unit.width_attrs}
    for attr, value in attrs.items():
        set_dotted_attr(unit.module, attr, value)
    return attrs


class StructuredPruneStage(Stage):
    """Remove attention heads and MLP neurons for real (torch-pruning)."""

    changes_architecture = True

    def ratios(self, adapter, model) -> dict[str, float]:
        ratio = self.config.ratio
        present = set(adapter.components(model))
        if isinstance(ratio, dict):
            if not ratio:
                raise VlmCompressError("structured_prune.ratio is an empty map; give a float or e.g. {vision: 0.5}")
            missing = [c for c in ratio if c not in present]
            if missing:
                raise VlmCompressError(
                    f"structured_prune.ratio names component(s) {missing} that {type(model).__name__} does not have; "
                    f"expected some of: {', '.join(c for c in COMPONENTS if c in present)}"
                )
            return dict(ratio)
        return {c: ratio for c in present}

    def units(self, model, adapter) -> tuple[list[AttentionUnit], list[MlpUnit]]:
        ratios = self.ratios(adapter, model)
        ignore = self.config.ignore
        full_names = {id(m): n for n, m in model.named_modules()}

        def keep(unit) -> bool:
            if ratios.get(unit.component, 0.0) <= 0.0:
                return False
            parts = unit.name.split(".")
            parents = [".".join(parts[:i]) for i in range(1, len(parts))]  # ignoring a layer ignores its units
            projections = [full_names[id(get_submodule(unit.module, p))] for p in _projection_names(unit)]
            return not any(matches(s, n) for s in ignore for n in parents + [unit.name] + projections)

        atts = [u for u in adapter.attention_units(model) if keep(u)] if "heads" in self.config.targets else []
        mlps = [u for u in adapter.mlp_units(model) if keep(u)] if "mlp" in self.config.targets else []
        return atts, mlps

    def needs_data(self) -> bool:
        return self.config.needs_data()

    def check(self, model, adapter) -> None:
        self.ratios(adapter, model)
        check_selectors(self.config.ignore, [n for n, _ in model.named_modules()], "structured_prune.ignore")

    def plan(self, model, adapter) -> dict[str, Any]:
        ratios = self.ratios(adapter, model)
        atts, mlps = self.units(model, adapter)
        plan: dict[str, Any] = {}
        for comp in ratios:
            heads = sum(u.num_kv_heads for u in atts if u.component == comp)
            width = sum(get_submodule(u.module, u.down).in_features for u in mlps if u.component == comp)
            params = sum(p.numel() for u in atts + mlps if u.component == comp for p in u.module.parameters())
            if heads or width:
                r = ratios[comp]
                plan[comp] = {"head_groups": [heads, heads - int(round(r * heads))],
                              "mlp_neurons": [width, width - int(round(r * width))],
                              "unit_params_estimate": [params, int(params * (1 - r))]}
        plan["modules"] = len(atts) + len(mlps)
        if "vision" in ratios:
            # FLOPs of the vision encoder at full token count, before and after a uniform cut of the same ratio
            v_att = [u for u in adapter.attention_units(model) if u.component == "vision"]
            v_mlp = [u for u in adapter.mlp_units(model) if u.component == "vision"]
            n0 = adapter.vision_tower(model).num_tokens
            before = encoder_gflops(model, v_att, v_mlp, [n0] * len(v_att))
            r_heads = ratios["vision"] if "heads" in self.config.targets else 0.0
            r_mlp = ratios["vision"] if "mlp" in self.config.targets else 0.0
            mlp_part = sum(2 * n0 * (len(u.up) + 1) * get_submodule(u.module, u.down).in_features *
                           get_submodule(u.module, u.down).out_features for u in v_mlp) / 1e9
            # attention FLOPs scale with the heads kept, MLP FLOPs with the neurons kept
            after = (before - mlp_part) * (1 - r_heads) + mlp_part * (1 - r_mlp)
            plan["vision_encoder_gflops_estimate"] = [round(before, 4), round(after, 4)]
        return plan

    def run(self, ctx: RunContext) -> StageReport:
        model, adapter = ctx.model, ctx.adapter
        report = StageReport(method="structured_prune", params_before=count_params(model))
        before = {n: list(p.shape) for n, p in model.named_parameters()}
        ratios = self.ratios(adapter, model)
        atts, mlps = self.units(model, adapter)
        importance = self.config
        importance.prepare(ctx)
        per_layer: dict[str, dict[str, list[int]]] = defaultdict(dict)
        for kind, units, score_fn, remove_fn in (("heads", atts, head_importance, remove_heads),
                                                  ("mlp", mlps, neuron_importance, remove_neurons)):
            for comp in ratios:
                chosen = [u for u in units if u.component == comp]
                if not chosen:
                    continue
                removals = choose_removals({u.name: score_fn(u, importance) for u in chosen}, ratios[comp],
                                           self.config.global_ranking)
                for u in chosen:
                    size_before = u.num_heads if kind == "heads" else get_submodule(u.module, u.down).in_features
                    attrs = remove_fn(u, removals[u.name])
                    if attrs:
                        ctx.compression["module_attrs"].setdefault(u.name, {}).update(attrs)
                    removed = len(removals[u.name]) * (u.num_heads // u.num_kv_heads if kind == "heads" else 1)
                    per_layer[u.name][kind] = [size_before, size_before - removed]
                    report.matched.append(u.name)
        model.zero_grad(set_to_none=True)
        after = {n: list(p.shape) for n, p in model.named_parameters()}
        ctx.compression["param_shapes"].update({n: s for n, s in after.items() if s != before.get(n)})
        _fix_fused_attention(model, ctx.compression)
        report.params_after = count_params(model)
        report.details = {"ratios": ratios, "per_module": dict(per_layer)}
        return report


def _projection_names(unit) -> list[str]:
    if isinstance(unit, AttentionUnit):
        return [p for p in (unit.q, unit.k, unit.v, unit.qkv, unit.out) if p]
    return [*unit.up, unit.down]


def _fix_fused_attention(model, compression) -> None:
    # BLIP / BLIP-2 stock attention infers the head width from the residual width, which is wrong once heads are
    # gone; the modeling code's fused-attention forward uses the recorded head_dim instead
    from ...modeling.shapes import patch_fused_attention

    patch_fused_attention(model, compression["param_shapes"])

