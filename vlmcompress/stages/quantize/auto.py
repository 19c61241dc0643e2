"""`backend: auto` (the default): `scheme: int8` on the int8 path of the PyTorch model that is fastest on this CPU —
torch's built-in dynamic int8 packed for one of its quantized engines, or torchao's int8 dynamic layers — chosen by
`int8_paths.resolve_int8` (a table per instruction set, optionally overridden by a probe on the model's own layer
shapes). The checkpoint is that backend's: `auto` only decides, and records the decision (`quantization.resolved`).
A recipe that names a backend keeps it."""

from __future__ import annotations

from typing import Any, Literal

from ..base import RunContext, decision_key
from . import int8_paths
from .stage import BACKENDS, QuantizeConfig, plan_modules, register_backend


@register_backend
class AutoInt8Config(QuantizeConfig):
    """The fastest int8 path of the PyTorch model on this CPU (torch's engines or torchao), chosen per CPU."""

    backend: Literal["auto"] = "auto"

    schemes = ("int8_dynamic",)
    cpu_speed = {"int8_dynamic": "the int8 path chosen for this CPU (docs/benchmarks.md, 'int8 by CPU'): 2.5-3x fp32 "
                                 "with VNNI, about 1.2-1.4x on AVX2 without it (ViT-B/16 tower, batch 32)"}

    def plan(self, model, adapter) -> dict[str, Any]:
        """The table's choice for this CPU (the probe, which times kernels, runs only in `apply`)."""
        from ...cpu import detect

        decision = int8_paths.resolve_int8(detect(), int8_paths.installed_paths())
        return super().plan(model, adapter) | {"int8": f"{decision.path} by the table for {decision.cpu_class} "
                                                       f"({decision.table_status}); the probe may override it"}

    def quantize(self, ctx: RunContext) -> dict[str, Any]:
        decision = decide(ctx, self, "auto")
        chosen = BACKENDS[decision.backend].model_validate(
            self.model_dump(exclude={"backend"}) | {"backend": decision.backend} | decision.options)
        chosen._decision, chosen._requested_backend = decision, self.backend
        return chosen.quantize(ctx)


def decide(ctx: RunContext, config: QuantizeConfig, backend: str) -> int8_paths.Int8Decision:
    """The run's int8 decision for this stage: the one recorded in the run's working folder when resuming, else
    resolved now (probing when enabled) and recorded there before any layer is quantized."""
    from ...cpu import detect

    key = decision_key(ctx.stage_index, "int8")
    if key in ctx.decisions:
        recorded = {k: v for k, v in ctx.decisions[key].items() if k != "int8"}
        return int8_paths.Int8Decision(**recorded)
    cpu, installed = detect(), int8_paths.installed_paths()
    timed = None
    if int8_paths.probe_enabled(ctx.world_size):
        paths = int8_paths.probe_candidates(cpu, installed, backend)
        if len(paths) > 1:
            layers, _ = plan_modules(ctx.model, ctx.adapter, config)
            shapes: dict[tuple[int, int], int] = {}
            for name in layers:
                module = ctx.model.get_submodule(name)
                shape = (module.in_features, module.out_features)
                shapes[shape] = shapes.get(shape, 0) + 1
            timed = int8_paths.probe(shapes, paths, cpu) if shapes else None
    decision = int8_paths.resolve_int8(cpu, installed, timed, backend)
    ctx.record_decision(key, decision.to_dict())
    return decision
