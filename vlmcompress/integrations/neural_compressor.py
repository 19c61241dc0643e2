"""Intel Neural Compressor (3.x torch API): weight-only RTN and GPTQ, int8 / int4.

RTN rounds each layer's weights to the nearest grid point (per output channel, or per group of input channels);
GPTQ (Frantar et al., 2023) quantizes the columns of each layer one block at a time and corrects the remaining
columns with the inverse Hessian of the layer's inputs, collected by running calibration data through the model.

INC's GPTQ walks the *first* stack of transformer blocks it finds (`trace_gptq_target_blocks`), so on a model with
several towers it would quantize only one of them; this module therefore runs GPTQ on one component at a time: the
component's inputs are captured from full-model forwards over the recipe's `data.train` (a pre-hook that stops the
forward there), then fed to the prepared component. Layers GPTQ did not reach (a component without a block stack,
e.g. a projector) fall back to RTN, and the report says so.

Known INC 3.10 problems worked around here: GPTQ always resolves `model_path` as a Hub id (even when layer-wise mode
is off) → a local folder is passed; the package needs `accelerate` without declaring it (the `neural_compressor`
extra adds it); its INFO logging is silenced.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from torch import nn

from . import optional_import


def _inc():
    saved = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = "ERROR"  # INC's logger reads its level from $LOGLEVEL when first imported
    try:
        # INC imports accelerate lazily and fails mid-quantization without it: ask for it first
        optional_import("accelerate", "accelerate", "neural_compressor")
        inc = optional_import("neural_compressor.torch.quantization", "neural-compressor-pt", "neural_compressor")
    finally:
        if saved is None:
            os.environ.pop("LOGLEVEL", None)
        else:
            os.environ["LOGLEVEL"] = saved
    logging.getLogger("neural_compressor").setLevel(logging.ERROR)
    return inc


def require() -> None:
    """Raise `BackendNotInstalledError` (with the pip command) now if the package is missing."""
    _inc()


def version() -> str:
    from importlib.metadata import version as v

    return v("neural-compressor-pt")


class _Captured(Exception):
    """Raised by the capture hook to stop a full-model forward once a component's inputs are recorded."""


def _component_inputs(model: nn.Module, component: nn.Module, calibrate) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = component.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        calibrate(model, on_batch_error=_Captured)
    finally:
        handle.remove()
    return captured


def quantize_linears(model: nn.Module, groups: dict[str, tuple[str, list[str]]], config: Any, calibrate=None
                     ) -> tuple[dict[str, dict], dict[str, nn.Module], dict[str, Any]]:
    """Quantize `nn.Linear` layers of `model` in place with INC's RTN or GPTQ; `groups` maps a component to
    `(scheme, layer names)`.

    Returns:
        (options to record per component: bits, group size, ...; `{name: INCWeightOnlyLinear}`; notes)
    """
    inc = _inc()
    dtype = model.get_submodule(next(iter(groups.values()))[1][0]).weight.dtype
    notes: dict[str, Any] = {"dtype": dtype, "algorithm": {}}
    options_by_group, kernels = {}, {}
    for comp, (scheme, names) in groups.items():
        bits = 4 if scheme == "int4_weight_only" else 8
        group_size = config.group_size if config.group_size is not None else (32 if bits == 4 else -1)
        gptq_done: set[str] = set()
        if config.algorithm == "gptq":
            gptq_done = _gptq(inc, model, names, bits, group_size, calibrate, notes)
        for name in names:
            if name in gptq_done:
                continue
            # RTN is layer-local: quantize each chosen layer on its own (exactly the chosen ones, nothing else)
            parent, _, child = name.rpartition(".")
            holder = nn.Sequential()
            holder.add_module("layer", model.get_submodule(name))
            holder = inc.convert(inc.prepare(holder, inc.RTNConfig(bits=bits, group_size=group_size, use_sym=True)))
            setattr(model.get_submodule(parent) if parent else model, child, holder.layer)
            notes["algorithm"][name] = "rtn"
        group_kernels = {name: model.get_submodule(name) for name in names}
        first = next(iter(group_kernels.values()))
        options_by_group[comp] = {"bits": bits, "group_size": int(group_size), "zp": bool(getattr(first, "zp", True)),
                                  "g_idx": False, "use_optimum_format": bool(first.use_optimum_format),
                                  "algorithm": config.algorithm}
        kernels |= group_kernels
    counts: dict[str, int] = {}
    for algo in notes.pop("algorithm").values():
        counts[algo] = counts.get(algo, 0) + 1
    notes["layers_by_algorithm"] = counts
    return options_by_group, kernels, notes


def _gptq(inc, model, names, bits, group_size, calibrate, notes) -> set[str]:
    """GPTQ on each top-level module that holds a stack of chosen layers; returns the names it quantized."""
    if calibrate is None:
        raise ValueError("gptq needs calibration data")
    done: set[str] = set()
    # group the chosen layers by their block stack (`...layers` ModuleList): one GPTQ run per stack
    stacks: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        idx = next((i for i in range(len(parts) - 1, 0, -1) if parts[i].isdigit()
                    and isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList)), None)
        if idx is None:
            continue
        stacks.setdefault(".".join(parts[:idx]), []).append(name)
    for stack_path, members in stacks.items():
        # the module that owns the stack (e.g. `vision_model.encoder`), called by the full model with its inputs
        owner_path = stack_path.rpartition(".")[0]
        owner = model.get_submodule(owner_path) if owner_path else model
        inputs = _component_inputs(model, owner, calibrate)
        cfg = inc.GPTQConfig(bits=bits, group_size=group_size, use_sym=True, model_path=tempfile.gettempdir())
        local = {n[len(owner_path) + 1:] if owner_path else n for n in members}
        for sub, module in owner.named_modules():
            if isinstance(module, nn.Linear) and sub not in local:
                cfg.set_local(sub, inc.GPTQConfig(dtype="fp32"))
        prepared = inc.prepare(owner, cfg)
        for args, kwargs in inputs:
            prepared(*args, **kwargs)
        converted = inc.convert(prepared)
        if converted is not owner:
            parent, _, child = owner_path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, converted)
        for n in members:
            if type(model.get_submodule(n)).__name__ == "INCWeightOnlyLinear":
                done.add(n)
                notes["algorithm"][n] = "gptq"
    return done
