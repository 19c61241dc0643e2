"""A student with fewer layers per component, initialised from chosen teacher layers (EfficientVLM's stage 1,
methods.md §6b), and the default teacher ↔ student layer maps of its hidden-state and attention losses.

Kernels here are pure functions of layer counts, except `keep_layers`, which edits a model in place.
"""

from __future__ import annotations

from typing import Any


def evenly_spaced(num_teacher: int, count: int) -> list[int]:
    """`count` teacher layer indices spread over `num_teacher` layers, first and last included (one layer: the
    first). E.g. 12 → 6: [0, 2, 4, 7, 9, 11]; 4 → 2: [0, 3]."""
    if count == 1:
        return [0]
    return [round(i * (num_teacher - 1) / (count - 1)) for i in range(count)]


def hidden_map(num_teacher: int, num_student: int) -> list[int]:
    """Teacher hidden-state index for each student hidden-state index (0 = the embeddings' output, i = layer i's
    output): student i ↔ teacher i · k with k = L_t / L_s (EfficientVLM's `i·k`, k = (H_t − 1) / (H_s − 1) over the
    H = L + 1 hidden states). Ends meet: student L_s ↔ teacher L_t."""
    return [round(i * num_teacher / num_student) for i in range(num_student + 1)]


def attention_map(num_teacher: int, num_student: int) -> list[int]:
    """Teacher layer whose attention each student layer matches: the last of its block of k = L_t / L_s layers."""
    return [round((j + 1) * num_teacher / num_student) - 1 for j in range(num_student)]


def config_at(config: Any, path: str) -> Any:
    for name in filter(None, path.split(".")):
        config = getattr(config, name)
    return config


def keep_layers(model, stack, keep: list[int]) -> None:
    """Keep only the layers `keep` (teacher indices, ascending) of `stack`, renumbered 0 … len(keep) − 1, and set
    the component's layer count in the config, so that the saved student reloads with the stock class."""
    from torch import nn  # here: the recipe side imports no torch

    parent_path, _, name = stack.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, name)
    setattr(parent, name, nn.ModuleList([layers[i] for i in keep]))
    config = config_at(model.config, stack.config_path)
    setattr(config, stack.count_attr, len(keep))
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(layers):
        config.layer_types = [types[i] for i in keep]
    for j, layer in enumerate(getattr(parent, name)):
        for module in layer.modules():  # decoder layers index their KV cache slot by layer_idx
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = j
