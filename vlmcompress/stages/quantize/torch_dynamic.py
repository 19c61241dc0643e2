"""`backend: torch` (the default): torch's built-in dynamic int8, symmetric per-channel int8 weights, activations
quantized per call (`torch.ops.quantized.linear_dynamic`); no extra package. Runtime: `modeling/quantized.py`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..base import RunContext
from .library import TorchModelConfig
from .stage import finish, install, register_backend, scheme_entry, start


@register_backend
class TorchDynamicConfig(TorchModelConfig):
    """torch's built-in dynamic int8 (the fastest eager CPU path measured)."""

    backend: Literal["torch"] = "torch"
    reduce_range: bool = Field(
        True, description="torch int8_dynamic: 7-bit activations, needed on x86 CPUs without VNNI (portable default)")

    schemes = ("int8_dynamic",)
    cpu_speed = {"int8_dynamic": "faster on CPU in eager mode (3.0x fp32 measured on ViT-B/16)"}

    def quantize(self, ctx: RunContext) -> dict[str, Any]:
        from ...modeling import quantized as qmod

        plan, schemes, spec = start(ctx, self)
        for comp, scheme in schemes.items():
            spec.schemes[comp] = scheme_entry(self, scheme, {"reduce_range": self.reduce_range})
        for name, comp in plan.items():
            linear = ctx.model.get_submodule(name)
            qdata, scale = qmod.quantize_int8_per_channel(linear.weight)
            tensors = {"weight.qdata": qdata, "weight.scale": scale}
            if linear.bias is not None:
                tensors["bias"] = linear.bias.detach().clone()
            install(ctx.model, spec, name, comp, tensors, linear.in_features, linear.out_features,
                    linear.weight.dtype)
        return finish(ctx, self, spec, schemes)
