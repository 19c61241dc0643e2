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

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import VlmCompressError
from ..modeling import quantized as qmod
from ..registry import register_method
from .base import COMPONENTS, Component, RunContext, Stage, StageConfig, StageReport, count_params
from .selectors import check_selectors, matches

Backend = Literal["torch", "torchao", "quanto", "neural_compressor", "onnxruntime"]
Scheme = Literal["int8", "int8_dynamic", "int8_weight_only", "int4_weight_only", "int8_static", "fp32"]

# what each backend can do; `int8` resolves to the first scheme in INT8_DEFAULT
BACKEND_SCHEMES: dict[str, tuple[str, ...]] = {
    "torch": ("int8_dynamic",),
    "torchao": ("int8_dynamic", "int8_weight_only", "int4_weight_only"),
    "quanto": ("int8_weight_only", "int4_weight_only", "int8_static"),
    "neural_compressor": ("int8_weight_only", "int4_weight_only"),
    "onnxruntime": ("int8_dynamic", "fp32"),
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
                            "activations), int8_weight_only, int4_weight_only, int8_static (calibrated activations), "
                            "fp32 (onnxruntime: export only)")
    components: list[Component] | None = Field(
        None, description="components to quantize (vision, text, qformer, projector, llm); all when unset")
    overrides: dict[Component, Scheme | Literal["none"]] = Field(
        default_factory=dict, description="per-component scheme, e.g. {text: int8_weight_only, projector: none}")
    ignore: list[str] = Field([], description="module names (exact or 're:' regex) kept in full precision")
    group_size: int | None = Field(
        None, ge=-1, description="weight-only int4/int8 group size (-1: per output channel); backend default if unset")
    algorithm: Literal["rtn", "gptq"] = Field(
        "rtn", description="neural_compressor weight-only rounding: rtn (round to nearest) or gptq (calibrated)")
    compile: bool | None = Field(
        None, description="torch.compile the quantized components when the checkpoint loads; unset: on for torchao "
                          "int8_dynamic (4.9x fp32 compiled against 2.2x eager on ViT-B/16), off otherwise")
    reduce_range: bool | None = Field(
        None, description="7-bit int8, which x86 CPUs without VNNI need against int16 overflow: torch int8_dynamic "
                          "quantizes activations to 7 bits (unset: true, portable); onnxruntime weights (unset: "
                          "chosen by this CPU, true without VNNI)")
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


def wants_compile(config: QuantizeConfig, schemes: dict[str, str]) -> bool:
    """`compile:` as given, or (unset) on when a torchao int8_dynamic layer gains from it (2.2x → 4.9x fp32)."""
    if config.compile is not None:
        return config.compile
    return config.backend == "torchao" and "int8_dynamic" in schemes.values()


def resolve_scheme(backend: str, scheme: str) -> str:
    """`int8` → the backend's default int8 scheme; anything else unchanged."""
    return INT8_DEFAULT[backend] if scheme == "int8" else scheme


BackendFn = Callable[[RunContext, QuantizeConfig], dict[str, Any]]

# What users are told about CPU speed: measured on the ViT-B/16-shaped tower as loaded back, 2 CPU threads
# (docs/benchmarks.md "Quantization"); speed-ups are throughput at batch 32 against fp32 in the same run.
CPU_SPEED: dict[tuple[str, str], str] = {
    ("torch", "int8_dynamic"): "faster on CPU in eager mode (3.0x fp32 measured on ViT-B/16)",
    ("torchao", "int8_dynamic"): "faster on CPU (2.2x fp32 eager, 4.9x with compile: true, measured on ViT-B/16)",
    ("torchao", "int8_weight_only"): "smaller only; not faster than fp32 on CPU (0.96x measured)",
    ("torchao", "int4_weight_only"): "smaller only; far slower than fp32 on CPU (about 0.02x measured: use it on GPU)",
    ("quanto", "int8_weight_only"): "smaller only; not faster than fp32 on CPU (0.96x measured)",
    ("quanto", "int4_weight_only"): "smaller only; not faster than fp32 on CPU (1.0x measured)",
    ("quanto", "int8_static"): "smaller only; CPU speed not measured",
    ("neural_compressor", "int8_weight_only"): "smaller only; not faster than fp32 on CPU (1.0x measured)",
    ("neural_compressor", "int4_weight_only"): "smaller only; not faster than fp32 on CPU (1.0x measured)",
}


def plan_modules(model: nn.Module, adapter: Any, config: QuantizeConfig) -> tuple[dict[str, str], dict[str, str]]:
    """Which linear layers get which scheme.

    Returns:
        (`{module name: component}` of the layers to quantize, `{component: resolved scheme}`). Layers of
        components whose scheme is `none`, layers matched (or inside a module matched) by `ignore`, linear layers
        that other code reads `.weight` from (inside `nn.MultiheadAttention`) and weights shared with another
        module (tied embeddings) are left in full precision.
    """
    components = adapter.components(model)
    chosen = config.components or list(components)
    schemes = {c: resolve_scheme(config.backend, config.overrides.get(c, config.scheme)) for c in chosen}
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    plan: dict[str, str] = {}
    for comp, scheme in schemes.items():
        if scheme == "none":
            continue
        path = adapter.component_paths[comp]
        for sub, module in components[comp].named_modules():
            name = f"{path}.{sub}" if sub else path
            if type(module) is not nn.Linear or owners.get(id(module.weight), 0) > 1:
                continue  # nn.MultiheadAttention's out_proj is a Linear subclass whose weight it reads directly
            parts = name.split(".")
            scope = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            if any(matches(sel, n) for sel in config.ignore for n in scope):
                continue
            plan[name] = comp
    return plan, schemes


def scheme_entry(backend: str, scheme: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"backend": backend, "scheme": scheme, "options": options,
            "cpu_speed": CPU_SPEED.get((backend, scheme), "not measured")}


def install(model: nn.Module, spec: dict[str, Any], name: str, scheme_id: str, tensors: dict[str, torch.Tensor],
            in_features: int, out_features: int, dtype: torch.dtype) -> None:
    """Replace the linear layer `name` by a `QuantizedLinear` holding `tensors` and record it in `spec`."""
    entry = {"scheme": scheme_id, "in_features": in_features, "out_features": out_features,
             "dtype": qmod.dtype_name(dtype),
             "tensors": {k: [list(t.shape), qmod.dtype_name(t.dtype)] for k, t in tensors.items()}}
    layer = qmod.quantized_layer(spec, entry, device=next(iter(tensors.values())).device)
    for key, t in tensors.items():
        setattr(layer, qmod.buffer_name(key), t.contiguous())
    layer.build()
    qmod.set_module(model, name, layer)
    spec["modules"][name] = entry


def calibration_batches(ctx: RunContext, config: QuantizeConfig) -> Callable[[nn.Module], None]:
    """A function that runs `model` on `calibration_batches` batches of the recipe's `data.train` (no gradients)."""
    from ..data import load_rows

    rows = load_rows(ctx.recipe.data.train, ctx.model, ctx.seed,
                     config.calibration_batches * config.calibration_batch_size)
    if ctx.processor is None:
        raise VlmCompressError("calibration needs the model's processor (tokenizer + image processor), and this "
                               "model has none; use a model folder that includes its processor files")

    def run(model: nn.Module, on_batch_error: type[Exception] | None = None) -> None:
        """One forward per batch; `on_batch_error` is an exception type that ends a batch's forward early (used by
        hooks that only need a component's inputs)."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for i in range(0, len(rows), config.calibration_batch_size):
                try:
                    ctx.adapter.task_loss(model, ctx.processor, rows[i:i + config.calibration_batch_size])
                except on_batch_error or ():
                    continue
        model.train(was_training)

    return run


def _start(ctx: RunContext, config: QuantizeConfig) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    if ctx.compression.get("quantization"):
        raise VlmCompressError("this model is already quantized; start from the unquantized model (quantize is the "
                               "last stage of a recipe and runs once)")
    plan, schemes = plan_modules(ctx.model, ctx.adapter, config)
    if not plan:
        raise VlmCompressError(f"quantize matched no linear layer (components {list(schemes)}, ignore "
                               f"{config.ignore}); check components / overrides / ignore")
    spec: dict[str, Any] = {"format_version": qmod.FORMAT_VERSION,
                            "requested": {"backend": config.backend, "scheme": config.scheme},
                            "schemes": {}, "modules": {}, "compile": []}
    return plan, schemes, spec


def _finish(ctx: RunContext, config: QuantizeConfig, spec: dict[str, Any], schemes: dict[str, str],
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record the spec, apply `compile`, and return the report details."""
    used = {e["scheme"] for e in spec["modules"].values()}
    spec["schemes"] = {k: v for k, v in spec["schemes"].items() if k in used}
    if wants_compile(config, schemes):
        spec["compile"] = [ctx.adapter.component_paths[c] for c in used]
        qmod.compile_components(ctx.model, spec["compile"])
        for entry in spec["schemes"].values():
            if (entry["backend"], entry["scheme"]) == ("torchao", "int8_dynamic"):
                entry["cpu_speed"] = ("faster on CPU: compiled when the checkpoint loads, 4.9x fp32 measured on "
                                      "ViT-B/16 (the first call per input shape compiles, tens of seconds)")
    if config.scheme == "int8":
        spec["resolved"] = {"int8": INT8_DEFAULT[config.backend],
                            "why": "the fastest int8 path of this backend measured on CPU (docs/benchmarks.md)"}
    ctx.compression["quantization"] = spec
    per_component: dict[str, int] = {}
    for entry in spec["modules"].values():
        per_component[entry["scheme"]] = per_component.get(entry["scheme"], 0) + 1
    details = {"backend": config.backend, "requested_scheme": config.scheme,
               "schemes": {c: s for c, s in schemes.items()},
               "layers_per_component": per_component,
               "cpu_speed": {c: e["cpu_speed"] for c, e in spec["schemes"].items()},
               "compile": spec["compile"], "matched": sorted(spec["modules"])}
    if "resolved" in spec:
        details["resolved"] = spec["resolved"]
    return details | (extra or {})


def quantize_torch(ctx: RunContext, config: QuantizeConfig) -> dict[str, Any]:
    """torch's built-in dynamic int8: symmetric per-channel int8 weights, activations quantized per call."""
    plan, schemes, spec = _start(ctx, config)
    for comp, scheme in schemes.items():
        spec["schemes"][comp] = scheme_entry("torch", scheme, {"reduce_range": config.reduce_range is not False})
    for name, comp in plan.items():
        linear = ctx.model.get_submodule(name)
        qdata, scale = qmod.quantize_int8_per_channel(linear.weight)
        tensors = {"weight.qdata": qdata, "weight.scale": scale}
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach().clone()
        install(ctx.model, spec, name, comp, tensors, linear.in_features, linear.out_features, linear.weight.dtype)
    return _finish(ctx, config, spec, schemes)


def quantize_with_library(backend: str) -> BackendFn:
    """The backend function of a library integration (`vlmcompress/integrations/<backend>.py: quantize_linears`)."""

    def run(ctx: RunContext, config: QuantizeConfig) -> dict[str, Any]:
        integration = importlib.import_module(f"vlmcompress.integrations.{MODULES[backend]}")
        plan, schemes, spec = _start(ctx, config)
        calibrate = calibration_batches(ctx, config) if QuantizeStage(config).needs_data() else None
        groups = {comp: (scheme, [n for n, c in plan.items() if c == comp]) for comp, scheme in schemes.items()}
        groups = {comp: g for comp, g in groups.items() if g[1]}
        # every group is quantized (and calibrated) before any layer is moved into the checkpoint format, so that
        # calibration passes never touch layers that were already recorded
        options, kernels, notes = integration.quantize_linears(ctx.model, groups, config, calibrate)
        for comp, (scheme, _) in groups.items():
            spec["schemes"][comp] = scheme_entry(backend, scheme, options[comp])
        for name, kernel in kernels.items():
            install(ctx.model, spec, name, plan[name], qmod.flatten_module(kernel), kernel.in_features,
                    kernel.out_features, notes["dtype"])
        extra = {k: v for k, v in notes.items() if k != "dtype" and v}
        extra["library_version"] = spec["library_version"] = f"{backend} {integration.version()}"
        return _finish(ctx, config, spec, schemes, extra)

    return run


MODULES = {"torchao": "torchao", "quanto": "quanto", "neural_compressor": "neural_compressor"}

# backend name → function(ctx, config) -> report details (with an optional "matched" list), or "module:function"
# imported when first used: an integration never has to import `stages`, and a missing optional package only matters
# when a recipe asks for it.
BACKENDS: dict[str, BackendFn | str] = {
    "torch": quantize_torch,
    "torchao": quantize_with_library("torchao"),
    "quanto": quantize_with_library("quanto"),
    "neural_compressor": quantize_with_library("neural_compressor"),
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
        if self.config.backend in MODULES:  # a missing package fails before anything runs
            importlib.import_module(f"vlmcompress.integrations.{MODULES[self.config.backend]}").require()

    def plan(self, model, adapter) -> dict[str, Any]:
        if self.config.backend == "onnxruntime":
            from ..integrations.onnx import plan_stage

            return plan_stage(model, adapter, self.config)
        layers, schemes = plan_modules(model, adapter, self.config)
        per_component = {c: sum(1 for v in layers.values() if v == c) for c in schemes}
        return {"backend": self.config.backend, "schemes": schemes, "layers": per_component,
                "cpu_speed": {c: CPU_SPEED.get((self.config.backend, s), "-") for c, s in schemes.items()}}

    def run(self, ctx: RunContext) -> StageReport:
        params = count_params(ctx.model)
        details = backend_function(self.config.backend)(ctx, self.config)
        return StageReport(method="quantize", matched=details.pop("matched", []), params_before=params,
                           params_after=params, details=details)


register_method("quantize", QuantizeConfig, QuantizeStage)

