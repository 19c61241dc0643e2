"""Small measuring helpers shared by several test files."""

from __future__ import annotations

from typing import Any, Callable

import torch


def layer_tokens(model: torch.nn.Module, layers_path: str, run: Callable[[], Any]) -> list[int]:
    """Token count each layer under `layers_path` returned, in call order, seen by hooks during `run()`."""
    seen: list[int] = []
    hooks = [layer.register_forward_hook(
        lambda mod, args, output: seen.append((output[0] if isinstance(output, tuple) else output).shape[1]))
        for layer in model.get_submodule(layers_path)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen
