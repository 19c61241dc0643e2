"""Training state without pickle: what `save_every` writes into the run's working folder, and what `apply --resume`
reads back, so that a killed run continues from its last saved step and ends bit-identical to an uninterrupted one.

    <folder>/trainable.safetensors   the parameters being trained, by name
    <folder>/optimizer.safetensors   AdamW's per-parameter state (`<index>.<name>`) and the RNG state of torch
    <folder>/state.json              step, the recipe hash it belongs to, optimizer hyper-parameters, the Python and
                                     NumPy RNG states, the best evaluation so far
    <folder>/best.safetensors        the trainable parameters at the best evaluated step (with eval_every)

Written by vlmcompress only (safetensors + JSON; `accelerator.save_state` would write pickles read back with
`torch.load`), atomically: a folder appears complete or not at all.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(`{"<param index>.<key>": tensor}`, the JSON part: param groups' hyper-parameters and non-tensor state)."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                plain[f"{index}.{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "plain": plain}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["plain"].items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[torch.Tensor, dict[str, Any]]:
    """(torch's CPU generator state, the Python and NumPy states as JSON)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return torch.get_rng_state(), {"python": [py[0], list(py[1]), py[2]],
                                   "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}


def set_rng_state(torch_state: torch.Tensor, meta: dict[str, Any]) -> None:
    torch.set_rng_state(torch_state)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_state(folder: Path, *, step: int, key: str, trainable: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, best: dict[str, Any] | None,
               best_tensors: dict[str, torch.Tensor] | None, extra: dict[str, Any] | None = None) -> None:
    """Write the state after `step` optimizer steps into `folder` (replacing a previous one atomically)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(trainable), str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    torch_rng, rng_meta = rng_state()
    save_file(_contiguous(opt_tensors) | {"__rng__.torch": torch_rng}, str(tmp / "optimizer.safetensors"))
    if best_tensors is not None:
        save_file(_contiguous(best_tensors), str(tmp / "best.safetensors"))
    meta = {"step": step, "key": key, "optimizer": opt_meta, "rng": rng_meta, "best": best, **(extra or {})}
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def read_state(folder: Path, key: str) -> dict[str, Any] | None:
    """The saved state in `folder` if it belongs to the same recipe prefix (`key`), else None."""
    folder = Path(folder)
    meta_file = folder / STATE_FILE
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        return None
    if meta.get("key") != key:
        return None
    meta["trainable"] = load_file(str(folder / "trainable.safetensors"))
    opt = load_file(str(folder / "optimizer.safetensors"))
    meta["torch_rng"] = opt.pop("__rng__.torch")
    meta["optimizer_tensors"] = opt
    best = folder / "best.safetensors"
    meta["best_tensors"] = load_file(str(best)) if best.is_file() else None
    return meta
