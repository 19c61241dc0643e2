"""Quantized linear layers, rebuilt from the checkpoint's `quantization` block before the weights load.

A quantized checkpoint stores, per quantized `nn.Linear`, plain tensors (integer data, scales, zero points, bias) as
ordinary safetensors entries, and in `config.json` a top-level `quantization` block (not `quantization_config`, which
transformers would hand to its own quantizers):

    {"format_version": 1,
     "schemes": {"vision": {"backend": "torch", "scheme": "int8_dynamic", "options": {...}}, ...},
     "modules": {"vision_model.encoder.layers.0.mlp.fc1":
                     {"scheme": "vision", "in_features": 32, "out_features": 64, "dtype": "float32",
                      "tensors": {"weight.qdata": [[64, 32], "int8"], "weight.scale": [[64], "float32"], ...}}},
     "compile": ["vision_model"], ...}

`apply_quantization` (called by `setup_compressed`, after pruning and token reduction) swaps every listed module for
a `QuantizedLinear` that holds exactly those tensors as buffers, so `from_pretrained` fills them like any weight.
On first use (or `build_quantized`), each `QuantizedLinear` builds its kernel module (`impl`) from its buffers without
copying them: torch's built-in dynamic int8 GEMM (fbgemm / oneDNN packed weights), or a torchao / optimum-quanto /
neural-compressor module whose quantized tensor subclasses are reassembled around the buffers
(`__tensor_unflatten__`). Those libraries are imported only here, only when the config names them.

The stage that quantizes a model in memory goes through the same `QuantizedLinear` and the same build, so the model
at the end of `apply` and the reloaded one compute identically.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from .spec import QuantizationSpec, QuantModuleSpec, QuantSchemeSpec
from .tensor_flattening import flatten_module, flatten_tensor, instantiate  # noqa: F401  (part of this module's API)

_EXTRAS = {"torchao": ("torchao", "torchao"), "quanto": ("optimum-quanto", "quanto"),
           "neural_compressor": ("neural-compressor-pt", "neural_compressor")}


def missing_backend(backend: str) -> ImportError:
    """The one-line error for a backend package that is not installed (an ImportError, so that the checkpoint's
    modeling code needs nothing from vlmcompress; vlmcompress turns it into its own error class)."""
    package, extra = _EXTRAS[backend]
    return ImportError(f"this quantized checkpoint needs the Python package '{package}', which is not installed; "
                       f"run: pip install 'vlmcompress[{extra}]'")


def buffer_name(key: str) -> str:
    """`weight.qdata` → `weight__qdata`: flattened tensor keys as module attribute names."""
    return key.replace(".", "__")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------------
# kernels


class DynamicInt8Linear(nn.Module):
    """torch's built-in dynamic int8 linear: int8 weights packed for fbgemm / oneDNN, activations quantized per call.

    Args:
        qdata: `[out, in]` int8 weights, symmetric per output channel.
        scale: `[out]` float scales (`weight ≈ qdata * scale[:, None]`).
        bias: `[out]` or None.
        reduce_range: quantize activations to 7 bits, which x86 CPUs without VNNI need to avoid int16 overflow.
        engine: the quantized engine the weights are packed for (`x86`, `fbgemm`, `onednn`, `qnnpack`); None: the
            process's current one. The packed weight keeps its engine whatever the global setting is later.
    """

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, reduce_range: bool,
                 engine: str | None = None):
        super().__init__()
        zero_points = torch.zeros(qdata.shape[0], dtype=torch.long)
        previous = torch.backends.quantized.engine
        if engine is not None and engine not in torch.backends.quantized.supported_engines:
            raise RuntimeError(f"this quantized checkpoint packs its int8 weights for torch's '{engine}' engine, "
                               f"which this torch build lacks (it has: "
                               f"{', '.join(torch.backends.quantized.supported_engines)}); quantize the model again "
                               f"on this machine")
        with warnings.catch_warnings():
            # quantized tensors are deprecated in torch (pytorch#184982) but remain the only eager int8 GEMM path
            warnings.simplefilter("ignore")
            try:
                if engine is not None:
                    torch.backends.quantized.engine = engine  # prepack packs for the current engine
                weight = torch._make_per_channel_quantized_tensor(qdata, scale.double(), zero_points, 0)
                self._packed = torch.ops.quantized.linear_prepack(weight, None if bias is None else bias.float())
            finally:
                torch.backends.quantized.engine = previous
        self.reduce_range = reduce_range
        self.engine = engine

    owns = ("weight.qdata",)  # the packed weight replaces these tensors (see `QuantizedLinear.build`)

    def unpacked(self) -> dict[str, torch.Tensor]:
        """The int8 weights back out of the packed format (exactly the tensors it was built from)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weight, _ = torch.ops.quantized.linear_unpack(self._packed)
            return {"weight.qdata": weight.int_repr()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., in]` → `[..., out]`, computed in float32 and returned in the input dtype."""
        y = torch.ops.quantized.linear_dynamic(x.float(), self._packed, self.reduce_range)
        return y.to(x.dtype)


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: `[out, in]` float → (`[out, in]` int8, `[out]` float32 scale)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    qdata = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return qdata, scale


def _torch_build(layer: QuantizedLinear) -> nn.Module:
    t = layer.tensors()
    options = layer.scheme["options"]
    return DynamicInt8Linear(t["weight.qdata"], t["weight.scale"], t.get("bias"),
                             bool(options.get("reduce_range", True)), options.get("engine"))


def torchao_config(scheme: str, options: dict[str, Any]):
    """The torchao config object of a vlmcompress scheme (torchao imported here, lazily)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    except ImportError:
        raise missing_backend("torchao") from None
    if scheme == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if scheme == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if scheme == "int4_weight_only":
        # torchao's default int4 layouts need CUDA kernels (mslk / tinygemm); the CPU one packs for
        # `_weight_int4pack_mm_for_cpu`
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=int(options.get("group_size", 128)))
    raise ValueError(f"unknown torchao scheme {scheme!r}")


def _torchao_template(scheme: dict, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
    from torchao.quantization import quantize_

    linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.linspace(-1, 1, in_features * out_features).view(out_features, in_features))
    quantize_(linear, torchao_config(scheme["scheme"], scheme["options"]))
    return linear


def quanto_qtypes(scheme: str):
    try:
        from optimum.quanto import qint4, qint8
    except ImportError:
        raise missing_backend("quanto") from None
    weights = qint4 if scheme == "int4_weight_only" else qint8
    return weights, (qint8 if scheme == "int8_static" else None)


def _quanto_template(scheme: dict, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
    from optimum.quanto import freeze, quantize

    holder = nn.Sequential(nn.Linear(in_features, out_features, bias=bias, dtype=dtype))
    with torch.no_grad():
        holder[0].weight.copy_(torch.linspace(-1, 1, in_features * out_features).view(out_features, in_features))
    weights, activations = quanto_qtypes(scheme["scheme"])
    quantize(holder, weights=weights, activations=activations)
    freeze(holder)
    return holder[0]


def _inc_template(scheme: dict, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
    try:
        from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear
    except ImportError:
        raise missing_backend("neural_compressor") from None
    o = scheme["options"]
    group_size = int(o["group_size"])
    group_size = in_features if group_size == -1 else group_size  # -1: one group per output channel
    return INCWeightOnlyLinear(in_features, out_features, bits=int(o["bits"]), group_size=group_size,
                               zp=bool(o.get("zp", True)), bias=bias, g_idx=bool(o.get("g_idx", False)),
                               use_optimum_format=bool(o.get("use_optimum_format", True)))


_TEMPLATE_BUILDERS = {"torchao": _torchao_template, "quanto": _quanto_template,
                      "neural_compressor": _inc_template}
_TEMPLATES: dict[tuple, nn.Module] = {}


def template_for(scheme: dict, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> nn.Module:
    """A quantized kernel module of the given shape, built once per shape from a fixed weight; only its structure
    (tensor subclasses and their metadata) is reused."""
    key = (repr(sorted(scheme.items())), in_features, out_features, bias, dtype)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = _TEMPLATE_BUILDERS[scheme["backend"]](scheme, in_features, out_features, bias, dtype)
    return _TEMPLATES[key]


def _template_build(layer: QuantizedLinear) -> nn.Module:
    tensors = layer.tensors()
    template = template_for(layer.scheme, layer.in_features, layer.out_features, "bias" in tensors,
                            _dtype(layer.dtype_name))
    return instantiate(template, tensors)


_BUILDERS = {"torch": _torch_build, "torchao": _template_build, "quanto": _template_build,
             "neural_compressor": _template_build}


# ---------------------------------------------------------------------------------------------------------------
# the module that lives in the model


def _drop_impl_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "impl.")]:
        del state_dict[key]


def _ignore_impl_missing(module, incompatible_keys):
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if ".impl." not in k]


class QuantizedLinear(nn.Module):
    """Replaces an `nn.Linear`; holds the quantized tensors as buffers and runs the backend's kernel module.

    Modifications: the weight is stored as the backend's integer data, scales and zero points (buffers named after
    the flattened keys, e.g. `weight__qdata`); `forward` builds the kernel module (`impl`) on first use, around those
    buffers, and calls it. `impl` is left out of `state_dict`, so saving writes only the buffers. A kernel that packs
    the weights into its own format (torch's fbgemm / oneDNN int8) owns them afterwards: the buffers it lists in
    `owns` are emptied, so the weights are held once, and recreated from the kernel (`unpacked`) to save, move or
    reload the layer.
    """

    def __init__(self, in_features: int, out_features: int, scheme: dict[str, Any], tensors: dict[str, list],
                 dtype: str = "float32", device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.dtype_name = dtype
        self.keys = list(tensors)
        for key, (shape, tdtype) in tensors.items():
            self.register_buffer(buffer_name(key), torch.empty(tuple(shape), dtype=_dtype(tdtype), device=device))
        self._released = False
        self._register_state_dict_hook(_drop_impl_keys)
        self.register_load_state_dict_post_hook(_ignore_impl_missing)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {key: getattr(self, buffer_name(key)) for key in self.keys}
        if self._released:
            out |= self._modules["impl"].unpacked()
        return out

    def build(self) -> nn.Module:
        """(Re)build the kernel module from the current buffers."""
        self._restore()
        impl = _BUILDERS[self.scheme["backend"]](self)
        self._modules["impl"] = impl
        if hasattr(impl, "unpacked"):
            for key in impl.owns:
                name = buffer_name(key)
                self._buffers[name] = self._buffers[name].new_empty(0)
            self._released = True
        return impl

    def _restore(self) -> None:
        """Put the tensors a packing kernel owns back into the buffers, and drop the kernel."""
        if self._released:
            for key, t in self._modules["impl"].unpacked().items():
                self._buffers[buffer_name(key)] = t.to(self._buffers[buffer_name(key)].device)
            self._released = False
        self._modules.pop("impl", None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._released:
            for key, t in self._modules["impl"].unpacked().items():
                destination[prefix + buffer_name(key)] = t

    def _load_from_state_dict(self, *args, **kwargs):
        self._restore()
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self._modules.get("impl")
        if impl is None:
            impl = self.build()
        return impl(x)

    def _apply(self, fn, recurse=True):
        # moving / casting replaces the buffers; the kernel module is rebuilt around the new ones on next use
        self._restore()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"backend={self.scheme['backend']}, scheme={self.scheme['scheme']}")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_layer(scheme: QuantSchemeSpec, entry: QuantModuleSpec, device=None) -> QuantizedLinear:
    """An empty `QuantizedLinear` for the layer `entry` of the block, quantized as `scheme`."""
    return QuantizedLinear(entry.in_features, entry.out_features, scheme.to_dict(), entry.tensors, entry.dtype,
                           device=device)


def build_quantized(model: nn.Module) -> None:
    """Build the kernel module of every `QuantizedLinear` that has none yet (eagerly, e.g. before compiling)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module._modules.get("impl") is None:
            module.build()


def _build_hook(module, args, kwargs):
    build_quantized(module)


def compile_components(model: nn.Module, paths: list[str]) -> None:
    """`torch.compile` the forward of each listed submodule; kernels are built eagerly by a pre-hook first, since
    building them (packing, tensor-subclass assembly) must not be traced."""
    for path in paths:
        module = model.get_submodule(path)
        if getattr(module, "_vlmc_compiled", False):
            continue
        module.register_forward_pre_hook(_build_hook, with_kwargs=True)
        module.forward = torch.compile(module.forward)
        module._vlmc_compiled = True


def apply_quantization(model: nn.Module, block: dict[str, Any] | QuantizationSpec | None) -> None:
    """Swap the `nn.Linear` modules listed in the `quantization` block for empty `QuantizedLinear`s (real or meta
    device); the checkpoint's tensors fill their buffers when the weights load."""
    spec = QuantizationSpec.read(block)
    if spec is None:
        return
    for backend in {s.backend for s in spec.schemes.values()}:
        if backend not in _BUILDERS:
            raise ValueError(f"unknown quantization backend {backend!r} in the checkpoint's config")
        if backend in _EXTRAS:
            _require(backend)
    for name, entry in spec.modules.items():
        if entry.scheme not in spec.schemes:
            raise ValueError(f"quantization.modules[{name!r}] names scheme {entry.scheme!r}, which the block's "
                             f"schemes ({sorted(spec.schemes)}) lack; the checkpoint's config.json is corrupt")
        old = model.get_submodule(name)
        device = next(iter(old.parameters()), torch.empty(0)).device
        set_module(model, name, quantized_layer(spec.schemes[entry.scheme], entry, device))
    if spec.compile:
        compile_components(model, spec.compile)


def _require(backend: str) -> None:
    """Import the backend now, so that a missing package fails at construction with the install hint."""
    try:
        if backend == "torchao":
            import torchao  # noqa: F401
        elif backend == "quanto":
            import optimum.quanto  # noqa: F401
        elif backend == "neural_compressor":
            saved = os.environ.get("LOGLEVEL")
            os.environ["LOGLEVEL"] = "ERROR"  # INC's logger reads its level from $LOGLEVEL when first imported
            try:
                import neural_compressor.torch  # noqa: F401
            finally:
                if saved is None:
                    os.environ.pop("LOGLEVEL", None)
                else:
                    os.environ["LOGLEVEL"] = saved
    except ImportError:
        raise missing_backend(backend) from None
