"""Quantized tensor subclasses (torchao, optimum-quanto, neural-compressor) to plain tensors and back.

A checkpoint stores a quantized layer as plain safetensors entries under dotted keys (`weight.qdata`,
`weight.scale`, ...): `flatten_module` walks each subclass's `__tensor_flatten__` to get them, and `instantiate`
rebuilds a kernel module around them with `__tensor_unflatten__`, aliasing the loaded tensors instead of copying
them. Shipped with every quantized checkpoint (imported by `quantized.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _is_subclass(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(type(t), "__tensor_flatten__")


def flatten_tensor(t: torch.Tensor, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Plain tensors of `t` under dotted keys (a quantized tensor subclass → its inner tensors, recursively)."""
    if _is_subclass(t):
        names, _ = t.__tensor_flatten__()
        for n in names:
            flatten_tensor(getattr(t, n), f"{prefix}.{n}", out)
    else:
        out[prefix] = t.detach()


def flatten_module(module: nn.Module) -> dict[str, torch.Tensor]:
    """`{"weight.qdata": int8 tensor, "weight.scale": ..., "bias": ...}` for a quantized kernel module's own
    parameters and buffers (children are not expected)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if t is not None:
            flatten_tensor(t, name, out)
    return out


def _rebuild_tensor(template: torch.Tensor, prefix: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if _is_subclass(template):
        names, ctx = template.__tensor_flatten__()
        inner = {n: _rebuild_tensor(getattr(template, n), f"{prefix}.{n}", tensors) for n in names}
        return type(template).__tensor_unflatten__(inner, ctx, template.size(), template.stride())
    return tensors[prefix]


def _rebind(value: Any, old: nn.Module, new: nn.Module) -> Any:
    """Methods bound to `old` (also inside hook dicts, e.g. quanto's activation-quantizing hooks) → bound to `new`;
    dicts are copied so that hooks added to one module later do not leak into the other."""
    if getattr(value, "__self__", None) is old and hasattr(value, "__func__"):
        return type(value)(value.__func__, new)  # a MethodType around the same function
    if isinstance(value, dict):
        copied = type(value)() if type(value) is not dict else {}
        for k, v in value.items():
            copied[k] = _rebind(v, old, new)
        return copied
    if isinstance(value, set):
        return set(value)
    return value


def instantiate(template: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the quantized kernel module `template` whose parameters and buffers are rebuilt around `tensors`
    (same structure as `flatten_module(template)`); nothing is copied, the new module aliases `tensors`."""
    module = type(template).__new__(type(template))
    for key, value in template.__dict__.items():  # a shallow copy; its tensors are replaced below
        module.__dict__[key] = _rebind(value, template, module)
    module._parameters = {}
    module._buffers = {}
    module._non_persistent_buffers_set = set(template._non_persistent_buffers_set)
    for name, t in template.named_parameters(recurse=False):
        module._parameters[name] = nn.Parameter(_rebuild_tensor(t, name, tensors), requires_grad=False)
    for name, t in template.named_buffers(recurse=False):
        module._buffers[name] = _rebuild_tensor(t, name, tensors)
    for name in ("bias",):  # a template built without bias keeps `bias = None`
        if name not in module._parameters and name not in module._buffers and hasattr(template, name):
            object.__setattr__(module, name, getattr(template, name))
    return module
