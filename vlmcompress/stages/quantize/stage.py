"""The `quantize` stage and the base of every backend's config: int8 / int4 weights (and int8 activations where that
speeds up CPU); always the last stage.

Several engines sit behind one stage (`backend:`); every one of them ends in the same vlmcompress-owned checkpoint
format: integer data, scales and zero points as ordinary safetensors entries, and the quantization spec as a
top-level `quantization` block of `config.json` that the shipped modeling code (`modeling/quantized.py`) replays at
construction, after pruning and token reduction, so that `from_pretrained` rebuilds the quantized modules before the
weights load.

A backend is one file of this package holding a `QuantizeConfig` subclass: its `backend: Literal[...]`, its own
knobs, the schemes it has (`schemes`, the first being what `scheme: int8` means for it), what users are told about
its CPU speed (`cpu_speed`), and its `quantize(ctx)`; registered by `register_backend`. This file names none.
`scheme: int8` is resolved by `resolve_scheme` alone; the resolution is written into the report and the checkpoint.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, model_validator

from ...errors import VlmCompressError
from ...modeling.spec import QUANTIZATION_FORMAT, QuantizationSpec, QuantModuleSpec, QuantSchemeSpec
from ...schema import PluggableStageConfig
from ...selectors import check_selectors, matches
from ..base import COMPONENTS, Component, RunContext, Stage, StageConfig, StageReport, count_params

Scheme = Literal["int8", "int8_dynamic", "int8_weight_only", "int4_weight_only", "int8_static", "fp32"]
BACKENDS: dict[str, type[QuantizeConfig]] = {}


class QuantizeConfig(PluggableStageConfig):
    """Quantize the linear layers of the chosen components; must be the last stage."""

    method: Literal["quantize"]
    backend: str = Field(
        "auto", description="auto (the fastest int8 path of the PyTorch model on this CPU: torch's engines or "
                            "torchao), torch (built-in dynamic int8), torchao, quanto, neural_compressor or "
                            "onnxruntime")
    scheme: Scheme = Field(
        "int8", description="int8 (the fastest int8 path for this CPU and backend), int8_dynamic (int8 weights and "
                            "activations), int8_weight_only, int4_weight_only, int8_static (calibrated activations), "
                            "fp32 (onnxruntime: export only)")
    components: list[Component] | None = Field(
        None, description="components to quantize (vision, text, qformer, projector, llm); all when unset")
    overrides: dict[Component, Scheme | Literal["none"]] = Field(
        default_factory=dict, description="per-component scheme, e.g. {text: int8_weight_only, projector: none}")
    ignore: list[str] = Field([], description="module names (exact or 're:' regex) kept in full precision")
    calibration_batches: int = Field(4, ge=1, description="int8_static / gptq: batches of data.train used")
    calibration_batch_size: int = Field(16, ge=1)

    # what a backend declares (class attributes, not recipe keys)
    schemes: ClassVar[tuple[str, ...]] = ()  # the schemes it has; the first is what `scheme: int8` resolves to
    # scheme → what users are told about its CPU speed: measured on the ViT-B/16-shaped tower as loaded back, 2 CPU
    # threads (docs/benchmarks.md "Quantization"); speed-ups are throughput at batch 32 against fp32 in the same run
    cpu_speed: ClassVar[dict[str, str]] = {}
    compiled_cpu_speed: ClassVar[dict[str, str]] = {}  # the same, when `compile` applies
    package: ClassVar[str | None] = None  # its integration module (`vlmcompress.integrations.<name>`), if any

    choice_key: ClassVar[str] = "backend"
    choice_default: ClassVar[str] = "auto"
    registry: ClassVar[dict[str, type[StageConfig]]] = BACKENDS
    # what `scheme: int8` resolved to in this run (`int8_paths.Int8Decision`), set by the backends that decide
    _decision: Any = PrivateAttr(default=None)
    _requested_backend: str | None = PrivateAttr(default=None)  # `auto` when auto handed the run to this backend

    @classmethod
    def foreign_keys_message(cls, data: dict[str, Any], foreign: dict[str, list[str]]) -> str:
        key, owners = next(iter(foreign.items()))
        wanted = owners[0] if len(owners) == 1 else f"{', '.join(owners[:-1])} or {owners[-1]}"
        return f"{key}: {data[key]} needs backend: {wanted} (got backend: {data.get('backend', cls.choice_default)})"

    @model_validator(mode="after")
    def _schemes_match_backend(self):
        for where, scheme in [("scheme", self.scheme), *((f"overrides.{c}", s) for c, s in self.overrides.items())]:
            if scheme not in ("int8", "none") and scheme not in self.schemes:
                raise ValueError(f"{where}: backend {self.backend} has no scheme {scheme!r}; expected one of: "
                                 f"int8, {', '.join(self.schemes)}")
        return self

    def needs_data(self) -> bool:
        """Whether this configuration reads the recipe's data.train (calibration)."""
        return "int8_static" in {self.scheme, *self.overrides.values()}

    def wants_compile(self, schemes: dict[str, str]) -> bool:
        """Whether the quantized components are compiled when the checkpoint loads (backends with `compile:`)."""
        return False

    def require(self) -> None:
        """Fail now, with the pip command, when the backend's package is missing."""
        if self.package:
            importlib.import_module(self.package).require()

    def quantize(self, ctx: RunContext) -> dict[str, Any]:
        """Quantize `ctx.model` in place (the spec goes to `ctx.compression`); returns the report details."""
        raise NotImplementedError

    def plan(self, model, adapter) -> dict[str, Any]:
        """What `validate` / `--dry-run` show, from shapes only."""
        layers, schemes = plan_modules(model, adapter, self)
        per_component = {c: sum(1 for v in layers.values() if v == c) for c in schemes}
        return {"backend": self.backend, "schemes": schemes, "layers": per_component,
                "cpu_speed": {c: self.cpu_speed.get(s, "-") for c, s in schemes.items()}}


def register_backend(config_cls: type[QuantizeConfig]) -> type[QuantizeConfig]:
    """Register a quantize backend (a `QuantizeConfig` subclass whose `backend` is a one-value `Literal`, with at
    least one scheme); a name is taken once. Usable as a decorator."""
    if isinstance(config_cls, type) and not getattr(config_cls, "schemes", ()):
        raise VlmCompressError(f"{config_cls.__name__} needs at least one scheme (schemes = (...))")
    QuantizeConfig.register_choice(config_cls, "quantize backend")
    return config_cls


def resolve_scheme(backend: str, scheme: str) -> str:
    """The one place `scheme: int8` is resolved: the backend's default int8 path (the first of its schemes, the
    fastest measured on CPU, docs/benchmarks.md); any other scheme unchanged."""
    return BACKENDS[backend].schemes[0] if scheme == "int8" else scheme


def backend_schemes() -> dict[str, tuple[str, ...]]:
    """`{backend: its schemes}` of every registered backend."""
    return {name: cls.schemes for name, cls in BACKENDS.items()}


def plan_modules(model, adapter: Any, config: QuantizeConfig) -> tuple[dict[str, str], dict[str, str]]:
    """Which linear layers get which scheme.

    Returns:
        (`{module name: component}` of the layers to quantize, `{component: resolved scheme}`). Layers of
        components whose scheme is `none`, layers matched (or inside a module matched) by `ignore`, linear layers
        that other code reads `.weight` from (inside `nn.MultiheadAttention`) and weights shared with another
        module (tied embeddings) are left in full precision.
    """
    from torch import nn

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


def scheme_entry(config: QuantizeConfig, scheme: str, options: dict[str, Any]) -> QuantSchemeSpec:
    return QuantSchemeSpec(backend=config.backend, scheme=scheme, options=options,
                           cpu_speed=config.cpu_speed.get(scheme, "not measured"))


def install(model, spec: QuantizationSpec, name: str, scheme_id: str, tensors: dict[str, Any], in_features: int,
            out_features: int, dtype) -> None:
    """Replace the linear layer `name` by a `QuantizedLinear` holding `tensors` and record it in `spec`."""
    from ...modeling import quantized as qmod

    entry = QuantModuleSpec(scheme=scheme_id, in_features=in_features, out_features=out_features,
                            dtype=qmod.dtype_name(dtype),
                            tensors={k: [list(t.shape), qmod.dtype_name(t.dtype)] for k, t in tensors.items()})
    layer = qmod.quantized_layer(spec.schemes[scheme_id], entry, device=next(iter(tensors.values())).device)
    for key, t in tensors.items():
        setattr(layer, qmod.buffer_name(key), t.contiguous())
    layer.build()
    qmod.set_module(model, name, layer)
    spec.modules[name] = entry


def calibration_batches(ctx: RunContext, config: QuantizeConfig) -> Callable[..., None]:
    """A function that runs `model` on `calibration_batches` batches of the recipe's `data.train` (no gradients)."""
    batches = list(ctx.batches("train", config.calibration_batches * config.calibration_batch_size,
                               config.calibration_batch_size))
    if ctx.processor is None:
        raise VlmCompressError("calibration needs the model's processor (tokenizer + image processor), and this "
                               "model has none; use a model folder that includes its processor files")

    def run(model, on_batch_error: type[Exception] | None = None) -> None:
        """One forward per batch; `on_batch_error` is an exception type that ends a batch's forward early (used by
        hooks that only need a component's inputs)."""
        import torch

        was_training = model.training
        model.eval()
        with torch.no_grad():
            for rows in batches:
                try:
                    ctx.adapter.task_loss(model, ctx.processor, rows)
                except on_batch_error or ():
                    continue
        model.train(was_training)

    return run


def start(ctx: RunContext, config: QuantizeConfig) -> tuple[dict[str, str], dict[str, str], QuantizationSpec]:
    if ctx.compression.get("quantization"):
        raise VlmCompressError("this model is already quantized; start from the unquantized model (quantize is the "
                               "last stage of a recipe and runs once)")
    plan, schemes = plan_modules(ctx.model, ctx.adapter, config)
    if not plan:
        raise VlmCompressError(f"quantize matched no linear layer (components {list(schemes)}, ignore "
                               f"{config.ignore}); check components / overrides / ignore")
    spec = QuantizationSpec(format_version=QUANTIZATION_FORMAT,
                            requested={"backend": config.backend, "scheme": config.scheme})
    return plan, schemes, spec


def finish(ctx: RunContext, config: QuantizeConfig, spec: QuantizationSpec, schemes: dict[str, str],
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record the spec, apply `compile`, and return the report details."""
    from ...modeling import quantized as qmod

    used = {e.scheme for e in spec.modules.values()}
    spec.schemes = {k: v for k, v in spec.schemes.items() if k in used}
    if config.wants_compile(schemes):
        # in component order: the order of a set of strings differs between processes
        spec.compile = [ctx.adapter.component_paths[c] for c in spec.schemes]
        qmod.compile_components(ctx.model, spec.compile)
        for entry in spec.schemes.values():
            entry.cpu_speed = config.compiled_cpu_speed.get(entry.scheme, entry.cpu_speed)
    advice = None
    if config.scheme == "int8" and config._decision is not None:
        decision = config._decision
        spec.resolved = decision.to_dict()
        spec.requested = {"backend": config._requested_backend or config.backend, "scheme": "int8"}
        if (decision.onnxruntime_speedup or 0) > 1.1:
            advice = (f"ONNX Runtime's int8 ran {decision.onnxruntime_speedup:.2f}x faster than {decision.path} on "
                      f"{decision.cpu_class} CPUs ({decision.table_status}); to deploy on such a CPU, quantize with "
                      f"backend: onnxruntime")
    elif config.scheme == "int8":
        spec.resolved = {"int8": resolve_scheme(config.backend, "int8"),
                         "why": "the fastest int8 path of this backend measured on CPU (docs/benchmarks.md)"}
    ctx.compression["quantization"] = spec.to_dict()
    per_component: dict[str, int] = {}
    for entry in spec.modules.values():
        per_component[entry.scheme] = per_component.get(entry.scheme, 0) + 1
    details = {"backend": config.backend, "requested_scheme": config.scheme,
               "schemes": {c: s for c, s in schemes.items()},
               "layers_per_component": per_component,
               "cpu_speed": {c: e.cpu_speed for c, e in spec.schemes.items()},
               "compile": spec.compile, "matched": sorted(spec.modules)}
    if spec.resolved is not None:
        details["resolved"] = spec.resolved
    if advice:
        details["advice"] = advice
    return details | (extra or {})


class QuantizeStage(Stage):
    """Quantize linear layers (torch dynamic int8, torchao, quanto, neural-compressor, ONNX Runtime)."""

    must_be_last = True
    changes_architecture = True  # linear layers become quantized modules (weights move into integer buffers)

    def needs_data(self) -> bool:
        return self.config.needs_data()

    def check(self, model, adapter) -> None:
        present = set(adapter.components(model))
        named = [c for c in (self.config.components or []) + list(self.config.overrides) if c not in present]
        if named:
            raise VlmCompressError(
                f"quantize names component(s) {sorted(set(named))} that {type(model).__name__} does not have; "
                f"expected some of: {', '.join(c for c in COMPONENTS if c in present)}")
        check_selectors(self.config.ignore, [n for n, _ in model.named_modules()], "quantize.ignore")
        self.config.require()  # a missing package fails before anything runs

    def plan(self, model, adapter) -> dict[str, Any]:
        return self.config.plan(model, adapter)

    def run(self, ctx: RunContext) -> StageReport:
        params = count_params(ctx.model)
        details = self.config.quantize(ctx)
        return StageReport(method="quantize", matched=details.pop("matched", []), params_before=params,
                           params_after=params, details=details)
