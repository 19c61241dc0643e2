"""What the backends that quantize the PyTorch model share: `compile:` (torch.compile the quantized components
when the checkpoint loads), and for the library backends (torchao, quanto, neural-compressor) one way to run a
library's quantizer and move its result into vlmcompress's checkpoint format."""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import Field

from ..base import RunContext
from .stage import QuantizeConfig, calibration_batches, finish, install, scheme_entry, start


class TorchModelConfig(QuantizeConfig):
    """Base of the backends whose result is the PyTorch model itself."""

    compile: bool | None = Field(
        None, description="torch.compile the quantized components when the checkpoint loads; unset: on for torchao "
                          "int8_dynamic (4.9x fp32 compiled against 2.2x eager on ViT-B/16), off otherwise")

    def wants_compile(self, schemes: dict[str, str]) -> bool:
        return bool(self.compile)


class LibraryConfig(TorchModelConfig):
    """Base of torchao, quanto and neural-compressor: `package` is `vlmcompress.integrations.<name>`, whose
    `quantize_linears(model, groups, config, calibrate)` quantizes the layers in place."""

    group_size: int | None = Field(
        None, ge=-1, description="weight-only int4/int8 group size (-1: per output channel); backend default if unset")

    def quantize(self, ctx: RunContext) -> dict[str, Any]:
        from ...modeling import quantized as qmod

        integration = importlib.import_module(self.package)
        plan, schemes, spec = start(ctx, self)
        calibrate = calibration_batches(ctx, self) if self.needs_data() else None
        groups = {comp: (scheme, [n for n, c in plan.items() if c == comp]) for comp, scheme in schemes.items()}
        groups = {comp: g for comp, g in groups.items() if g[1]}
        # every group is quantized (and calibrated) before any layer is moved into the checkpoint format, so that
        # calibration passes never touch layers that were already recorded
        options, kernels, notes = integration.quantize_linears(ctx.model, groups, self, calibrate)
        for comp, (scheme, _) in groups.items():
            spec.schemes[comp] = scheme_entry(self, scheme, options[comp])
        for name, kernel in kernels.items():
            install(ctx.model, spec, name, plan[name], qmod.flatten_module(kernel), kernel.in_features,
                    kernel.out_features, notes["dtype"])
        extra = {k: v for k, v in notes.items() if k != "dtype" and v}
        extra["library_version"] = spec.library_version = f"{self.backend} {integration.version()}"
        return finish(ctx, self, spec, schemes, extra)
