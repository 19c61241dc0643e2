"""The `structured_prune` stage and the base of every importance's config: remove attention heads and MLP neurons for
real (smaller tensors). An importance is one file of this package holding a `StructuredPruneConfig` subclass (its
`importance: Literal`, its per-element score, whether it reads data and what it computes first), registered by
`register_importance`; this file names none. With `magnitude` (the default), importance is the squared L2 norm of each
head's (or neuron's) weights across every projection it is coupled to, normalised by the mean of its layer so that
one global ranking per component can remove more from the layers that matter less (non-uniform per-layer widths). At
least one head and one neuron stay in every layer. The residual width never changes, so projection dimensions of
dual encoders, the vision → projector → LLM interface and fused `qkv` layouts stay consistent; grouped-query
attention is pruned a key/value group at a time.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from ...errors import VlmCompressError
from ...schema import PluggableStageConfig
from ...selectors import check_selectors, matches
from ..base import COMPONENTS, Component, RunContext, Stage, StageConfig, StageReport, count_params

Ratio = Annotated[float, Field(ge=0.0, lt=1.0)]


IMPORTANCES: dict[str, type[StructuredPruneConfig]] = {}


class StructuredPruneConfig(PluggableStageConfig):
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

    choice_key: ClassVar[str] = "importance"
    choice_default: ClassVar[str] = "magnitude"
    registry: ClassVar[dict[str, type[StageConfig]]] = IMPORTANCES

    def needs_data(self) -> bool:
        """Whether this importance reads the recipe's data.train."""
        return False

    def prepare(self, ctx: RunContext) -> None:
        """What the importance computes on the model before the scores are read (Taylor: gradients)."""

    def element_score(self, p: Any) -> Any:
        """Per-element importance of a weight or bias `p` (same shape)."""
        raise NotImplementedError


def register_importance(config_cls: type[StructuredPruneConfig]) -> type[StructuredPruneConfig]:
    """Register a pruning importance (a `StructuredPruneConfig` subclass whose `importance` is a one-value
    `Literal`); a name is taken once. Usable as a decorator."""
    StructuredPruneConfig.register_choice(config_cls, "pruning importance")
    return config_cls


def _config_for(kind: str | StructuredPruneConfig) -> StructuredPruneConfig:
    return kind if isinstance(kind, StructuredPruneConfig) else IMPORTANCES[kind].model_construct(importance=kind)


def head_importance(unit, kind: str | StructuredPruneConfig = "magnitude"):
    """`[num_kv_heads]` importance of each head group of `unit` under importance `kind` (a name or a config)."""
    from . import pruning

    return pruning.head_importance(unit, _config_for(kind).element_score)


def neuron_importance(unit, kind: str | StructuredPruneConfig = "magnitude"):
    """`[width]` importance of each MLP neuron of `unit` under importance `kind` (a name or a config)."""
    from . import pruning

    return pruning.neuron_importance(unit, _config_for(kind).element_score)


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

    def units(self, model, adapter) -> tuple[list, list]:
        """The attention and MLP units (`AttentionUnit`, `MlpUnit`) this stage prunes."""
        from ...adapters import get_submodule
        from .pruning import _projection_names

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
        from ...adapters import get_submodule
        from ...measure.estimate import embedding_flops, layer_shapes, mlp_flops, tower_flops

        ratios = self.ratios(adapter, model)
        atts, mlps = self.units(model, adapter)
        plan: dict[str, Any] = {}
        for comp in ratios:
            heads = sum(u.num_kv_heads for u in atts if u.component == comp)
            width = sum(get_submodule(u.module, u.down).in_features for u in mlps if u.component == comp)
            params = sum(p.numel() for u in atts + mlps if u.component == comp for p in u.module.parameters())
            if heads or width:
                r = ratios[comp]
                targets = self.config.targets
                plan[comp] = {
                    "head_groups": [heads, heads - int(round(r * heads))] if "heads" in targets else "not targeted",
                    "mlp_neurons": [width, width - int(round(r * width))] if "mlp" in targets else "not targeted",
                    "unit_params_estimate": [params, int(params * (1 - r))]}
        plan["modules"] = len(atts) + len(mlps)
        if "vision" in ratios:
            # FLOPs of the vision encoder at full token count, before and after a uniform cut of the same ratio
            n0 = adapter.vision_tower(model).num_tokens
            shapes = layer_shapes(model, adapter, "vision")
            before = tower_flops(model, adapter, "vision", [n0] * len(shapes))
            r_heads = ratios["vision"] if "heads" in self.config.targets else 0.0
            r_mlp = ratios["vision"] if "mlp" in self.config.targets else 0.0
            mlp_part = sum(mlp_flops(s, n0) for s in shapes)
            attention_part = before - mlp_part - embedding_flops(model, adapter, "vision")
            # attention FLOPs scale with the heads kept, MLP FLOPs with the neurons kept
            after = before - attention_part * r_heads - mlp_part * r_mlp
            plan["vision_encoder_gflops_estimate"] = [round(before / 1e9, 4), round(after / 1e9, 4)]
        return plan

    def run(self, ctx: RunContext) -> StageReport:
        from ...adapters import get_submodule
        from .pruning import _fix_fused_attention, choose_removals, remove_heads, remove_neurons

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


