"""`quantize`: int8 / int4 weights (and int8 activations where that speeds up CPU); always the last stage.

Several engines sit behind one stage (`backend:`); every one of them ends in the same vlmcompress-owned checkpoint
format: integer data, scales and zero points as ordinary safetensors entries, and the quantization spec as a
top-level `quantization` block of `config.json` that the shipped modeling code (`modeling/quantized.py`) replays at
construction, after pruning and token reduction, so that `from_pretrained` rebuilds the quantized modules before the
weights load. Backends are dispatched through `BACKENDS` (name → `function(ctx, config) -> report details`).

`scheme: int8` names the default int8 path of the chosen backend, resolved to the fastest one measured on CPU
(see `INT8_DEFAULT`); the resolution is written into the report and the checkpoint.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, model_validator

from ..errors import VlmCompressError
from ..registry import register_method
from .base import COMPONENTS, Component, RunContext, Stage, StageConfig, StageReport, count_params
from .selectors import check_selectors, matches

Backend = Literal["torch", "torchao", "quanto", "neural_compressor", "onnxruntime"]
Scheme = Literal["int8", "int8_dynamic", "int8_weight_only", "int4_weight_only", "int8_static"]

# what each backend can do; `int8` resolves to the first scheme in INT8_DEFAULT
BACKEND_SCHEMES: dict[str, tuple[str, ...]] = {
    "torch": ("int8_dynamic",),
    "torchao": ("int8_dynamic", "int8_weight_only", "int4_weight_only"),
    "quanto": ("int8_weight_only", "int4_weight_only", "int8_static"),
    "neural_compressor": ("int8_weight_only", "int4_weight_only"),
    "onnxruntime": ("int8_dynamic",),
}
# `scheme: int8` per backend, chosen by CPU measurements (docs/benchmarks.md, "Quantization")
INT8_DEFAULT: dict[str, str] = {
    "torch": "int8_dynamic",
    "torchao": "int8_dynamic",
    "quanto": "int8_weight_only",
    "neural_compressor": "int8_weight_only",
    "onnxruntime": "int8_dynamic",
}


class QuantizeConfig(StageConfig):
    """Quantize the linear layers of the chosen components; must be the last stage."""

    method: Literal["quantize"]
    backend: Backend = Field(
        "torch", description="torch (built-in dynamic int8, fastest eager CPU path), torchao, quanto, "
                             "neural_compressor or onnxruntime")
    scheme: Scheme = Field(
        "int8", description="int8 (the backend's fastest measured int8 path), int8_dynamic (int8 weights and "
                            "activations), int8_weight_only, int4_weight_only, int8_static (calibrated activations)")
    components: list[Component] | None = Field(
        None, description="components to quantize (vision, text, qformer, projector, llm); all when unset")
    overrides: dict[Component, Scheme | Literal["none"]] = Field(
        default_factory=dict, description="per-component scheme, e.g. {text: int8_weight_only, projector: none}")
    ignore: list[str] = Field([], description="module names (exact or 're:' regex) kept in full precision")
    group_size: int | None = Field(
        None, ge=-1, description="weight-only int4/int8 group size (-1: per output channel); backend default if unset")
    algorithm: Literal["rtn", "gptq"] = Field(
        "rtn", description="neural_compressor weight-only rounding: rtn (round to nearest) or gptq (calibrated)")
    compile: bool = Field(
        False, description="torch.compile the quantized components when the checkpoint loads (torchao int8_dynamic "
                           "is only faster than fp32 on CPU when compiled)")
    calibration_batches: int = Field(4, ge=1, description="int8_static / gptq: batches of data.train used")
    calibration_batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _schemes_match_backend(self):
        allowed = BACKEND_SCHEMES[self.backend]
        for where, scheme in [("scheme", self.scheme), *((f"overrides.{c}", s) for c, s in self.overrides.items())]:
            if scheme not in ("int8", "none") and scheme not in allowed:
                raise ValueError(f"{where}: backend {self.backend} has no scheme {scheme!r}; expected one of: "
                                 f"int8, {', '.join(allowed)}")
        if self.algorithm == "gptq" and self.backend != "neural_compressor":
            raise ValueError(f"algorithm: gptq needs backend: neural_compressor (got backend: {self.backend})")
        return self


def resolve_scheme(backend: str, scheme: str) -> str:
    """`int8` → the backend's default int8 scheme; anything else unchanged."""
    return INT8_DEFAULT[backend] if scheme == "int8" else scheme


BackendFn = Callable[[RunContext, QuantizeConfig], dict[str, Any]]

# backend name → function(ctx, config) -> report details (with an optional "matched" list), or "module:function"
# imported when first used: an integration never has to import `stages`, and a missing optional package only matters
# when a recipe asks for it. The in-process backends are filled in below, once their functions are defined.
BACKENDS: dict[str, BackendFn | str] = {
    "onnxruntime": "vlmcompress.integrations.onnx:quantize_stage",
}


def backend_function(name: str) -> BackendFn:
    """The callable registered for backend `name` (imports it on first use)."""
    entry = BACKENDS.get(name)
    if entry is None:
        raise VlmCompressError(f"quantize backend {name!r} is not available in this version; "
                               f"available: {', '.join(sorted(BACKENDS))}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        BACKENDS[name] = entry
    return entry


class QuantizeStage(Stage):
    """Quantize linear layers (torch dynamic int8, torchao, quanto, neural-compressor, ONNX Runtime)."""

    must_be_last = True

    def needs_data(self) -> bool:
        cfg = self.config
        schemes = {cfg.scheme, *cfg.overrides.values()}
        return cfg.algorithm == "gptq" or "int8_static" in schemes

    def check(self, model, adapter) -> None:
        present = set(adapter.components(model))
        named = [c for c in (self.config.components or []) + list(self.config.overrides) if c not in present]
        if named:
            raise VlmCompressError(
                f"quantize names component(s) {sorted(set(named))} that {type(model).__name__} does not have; "
                f"expected some of: {', '.join(c for c in COMPONENTS if c in present)}")
        check_selectors(self.config.ignore, [n for n, _ in model.named_modules()], "quantize.ignore")

    def run(self, ctx: RunContext) -> StageReport:
        params = count_params(ctx.model)
        details = backend_function(self.config.backend)(ctx, self.config)
        return StageReport(method="quantize", matched=details.pop("matched", []), params_before=params,
                           params_after=params, details=details)


register_method("quantize", QuantizeConfig, QuantizeStage)

__all__ = ["BACKENDS", "QuantizeConfig", "QuantizeStage", "backend_function", "matches", "resolve_scheme"]
