"""torchao: int8 dynamic-activation + int8 weight, int8 weight-only and int4 weight-only linear layers.

`quantize_linears` runs torchao's own `quantize_` on the chosen layers; the `quantize` stage then moves the
resulting tensor subclasses' inner tensors (`qdata`, `scale`, `zero_point`, ...) into vlmcompress's checkpoint format
(torchao's own safetensors round trip through transformers does not reload with transformers 5.23 + torchao 0.18).
On CPU, int8_dynamic is only faster than fp32 under `torch.compile`; int4 uses torchao's CPU layout
(`PrototypeInt4WeightOnlyConfig`, packed for `_weight_int4pack_mm_for_cpu`), because the default int4 layouts need
CUDA kernels (the `mslk` package).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from . import optional_import


def _torchao():
    # the CPU wheel logs failures to load its CUDA-only kernels on import; they are not used here
    logging.getLogger("torchao").setLevel(logging.ERROR)
    return optional_import("torchao", "torchao", "torchao")


def require() -> None:
    """Raise `BackendNotInstalledError` (with the pip command) now if the package is missing."""
    _torchao()


def version() -> str:
    from importlib.metadata import version as v

    return v("torchao")


def quantize_linears(model: nn.Module, groups: dict[str, tuple[str, list[str]]], config: Any, calibrate=None
                     ) -> tuple[dict[str, dict], dict[str, nn.Module], dict[str, Any]]:
    """Quantize `nn.Linear` layers of `model` in place with torchao; `groups` maps a component to
    `(scheme, layer names)`.

    Returns:
        (scheme options to record per component, `{name: quantized nn.Linear}`, notes: `dtype` and the `skipped`
        layers with reasons)
    """
    _torchao()
    from torchao.quantization import quantize_

    from ..modeling.quantized import torchao_config

    options_by_group: dict[str, dict] = {}
    kernels, skipped = {}, {}
    dtype = model.get_submodule(next(iter(groups.values()))[1][0]).weight.dtype
    for comp, (scheme, names) in groups.items():
        options: dict[str, Any] = {}
        if scheme == "int4_weight_only":
            options["group_size"] = config.group_size if config.group_size and config.group_size > 0 else 128
        options_by_group[comp] = options
        wanted = set(names)
        if scheme == "int4_weight_only":
            for name in names:
                layer = model.get_submodule(name)
                # the CPU int4 kernel packs 16 output rows at a time and groups whole input blocks
                if layer.out_features % 16 or layer.in_features % options["group_size"]:
                    skipped[name] = (f"[{layer.out_features}, {layer.in_features}] weight: the CPU int4 layout needs "
                                     f"out_features % 16 == 0 and in_features % {options['group_size']} == 0")
                    wanted.discard(name)
        quantize_(model, torchao_config(scheme, options),
                  filter_fn=lambda module, fqn: fqn in wanted and isinstance(module, nn.Linear))
        for name in wanted:
            layer = model.get_submodule(name)
            if hasattr(type(layer.weight), "__tensor_flatten__"):
                kernels[name] = layer
            else:
                skipped[name] = "torchao left it unquantized"
    return options_by_group, kernels, {"dtype": dtype, "skipped": skipped}
