"""optimum-quanto: int8 / int4 weights, optionally int8 activations calibrated on the recipe's data.

`quantize_linears` runs quanto's `quantize` (+ `Calibration` for int8 activations) and `freeze` on the chosen layers;
the `quantize` stage moves the frozen `QLinear`s' tensors into vlmcompress's checkpoint format (quanto's own reload,
`requantize`, needs quanto-specific keys and a separate quantization map, and transformers' `QuantoConfig` path is
not serializable).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import optional_import


def _quanto():
    return optional_import("optimum.quanto", "optimum-quanto", "quanto")


def require() -> None:
    """Raise `BackendNotInstalledError` (with the pip command) now if the package is missing."""
    _quanto()


def version() -> str:
    from importlib.metadata import version as v

    return v("optimum-quanto")


def quantize_linears(model: nn.Module, groups: dict[str, tuple[str, list[str]]], config: Any, calibrate=None
                     ) -> tuple[dict[str, dict], dict[str, nn.Module], dict[str, Any]]:
    """Quantize `nn.Linear` layers of `model` in place with quanto; `groups` maps a component to
    `(scheme, layer names)`.

    `int8_static` calibrates activation scales by running `calibrate(model)` (batches of `data.train`) inside
    `quanto.Calibration()`, once, after every group is quantized. Returns (options per component,
    `{name: frozen QLinear}`, notes).
    """
    quanto = _quanto()
    from ..modeling.quantized import quanto_qtypes

    dtype = model.get_submodule(next(iter(groups.values()))[1][0]).weight.dtype
    options, needs_calibration = {}, False
    for comp, (scheme, names) in groups.items():
        weights, activations = quanto_qtypes(scheme)
        options[comp] = {"weights": str(weights), "activations": str(activations)}
        needs_calibration |= activations is not None
        for name in names:
            # one layer at a time: quanto's `include` patterns are fnmatch globs, exact names are safer this way
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            quanto.quantize(holder, weights=weights, activations=activations, include=[child], exclude=None)
    if needs_calibration:
        if calibrate is None:
            raise ValueError("int8_static needs calibration data")
        with quanto.Calibration(momentum=0.9):
            calibrate(model)
    kernels = {name: model.get_submodule(name) for _, names in groups.values() for name in names}
    for layer in kernels.values():
        layer.freeze()
    return options, kernels, {"dtype": dtype}
