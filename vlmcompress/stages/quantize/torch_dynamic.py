"""`backend: torch`: torch's built-in dynamic int8, symmetric per-channel int8 weights packed for one of torch's
quantized engines, activations quantized per call (`torch.ops.quantized.linear_dynamic`); no extra package. The
engine and the activations' bits are chosen for this CPU unless given (`int8_paths`). Runtime:
`modeling/quantized.py`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..base import RunContext
from .library import TorchModelConfig
from .stage import finish, install, register_backend, scheme_entry, start


@register_backend
class TorchDynamicConfig(TorchModelConfig):
    """torch's built-in dynamic int8, packed for one of torch's quantized engines."""

    backend: Literal["torch"] = "torch"
    reduce_range: bool | None = Field(
        None, description="torch int8_dynamic: 7-bit activations, needed on x86 CPUs without VNNI; unset: chosen for "
                          "this CPU and engine (true only where 8 bits could saturate)")
    engine: Literal["x86", "fbgemm", "onednn", "qnnpack"] | None = Field(
        None, description="torch's quantized engine the weights are packed for; unset: the fastest for this CPU "
                          "(scheme: int8 may probe; docs/benchmarks.md 'int8 by CPU')")

    schemes = ("int8_dynamic",)
    cpu_speed = {"int8_dynamic": "faster on CPU in eager mode: 2.5-3x fp32 with VNNI, about 1.2-1.4x on AVX2 "
                                 "without it (ViT-B/16 tower, batch 32; docs/benchmarks.md 'int8 by CPU')"}

    def quantize(self, ctx: RunContext) -> dict[str, Any]:
        from ...modeling import quantized as qmod

        plan, schemes, spec = start(ctx, self)
        options = self.kernel_options(ctx)
        for comp, scheme in schemes.items():
            spec.schemes[comp] = scheme_entry(self, scheme, options)
        for name, comp in plan.items():
            linear = ctx.model.get_submodule(name)
            qdata, scale = qmod.quantize_int8_per_channel(linear.weight)
            tensors = {"weight.qdata": qdata, "weight.scale": scale}
            if linear.bias is not None:
                tensors["bias"] = linear.bias.detach().clone()
            install(ctx.model, spec, name, comp, tensors, linear.in_features, linear.out_features,
                    linear.weight.dtype)
        return finish(ctx, self, spec, schemes)

    def kernel_options(self, ctx: RunContext) -> dict[str, Any]:
        """`{engine, reduce_range}`: as given; what is unset comes from the int8 decision (`scheme: int8`, which may
        probe) or from the table for this CPU (`scheme: int8_dynamic`)."""
        from ...cpu import detect
        from . import int8_paths
        from .auto import decide

        if self.scheme == "int8" and self._decision is None:
            self._decision = decide(ctx, self, "torch")
        engine = self.engine or (self._decision.options.get("engine") if self._decision else None)
        cpu = detect()
        if engine is None:
            engine = int8_paths.PATHS[int8_paths.resolve_int8(cpu, int8_paths.installed_paths(), None,
                                                              "torch").path].engine
        reduce_range = self.reduce_range
        if reduce_range is None:
            reduce_range = int8_paths.needs_reduce_range(cpu, int8_paths.PATHS[f"torch-{engine}"])
        return {"engine": engine, "reduce_range": reduce_range}
