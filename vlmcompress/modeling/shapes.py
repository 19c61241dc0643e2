"""Re-create the shapes that structured pruning left behind, before the checkpoint's weights are loaded.

A pruned model's per-layer widths differ from what its base config describes (transformers configs hold one
`num_attention_heads` / `intermediate_size` per tower), so the checkpoint's config records every parameter whose
shape changed and every module attribute that pruning rewrote; `apply_shape_record` replays that record on a model
freshly built from the base config. Works on real and meta tensors alike.
"""

from __future__ import annotations

import torch
from torch import nn

from .patching import swap_forward


def set_dotted_attr(root: nn.Module, dotted: str, value: int) -> None:
    """Set the integer attribute `dotted` (`"attention.num_attention_heads"`) of a submodule of `root`: the path runs
    through submodules only, and only an existing integer attribute is replaced (a shape record changes sizes, never
    methods or classes; `CheckpointRecord.read` also checks the names against `SHAPE_ATTRIBUTES`)."""
    *parents, last = dotted.split(".")
    owner = root.get_submodule(".".join(parents)) if parents else root
    current = getattr(owner, last, None)
    if last.startswith("_") or not isinstance(current, int) or isinstance(current, bool):
        raise ValueError(f"module attribute {dotted!r} of {type(root).__name__} is not an integer setting "
                         f"(found {type(current).__name__}); the shape record cannot set it")
    setattr(owner, last, value)


def apply_shape_record(
    model: nn.Module, param_shapes: dict[str, list[int]], module_attrs: dict[str, dict[str, object]]
) -> None:
    """Resize parameters to `param_shapes` (`{"a.b.weight": [out, in]}`) and set `module_attrs`
    (`{"a.b": {"num_heads": 2}}`). New parameters are uninitialised: the checkpoint's weights fill them."""
    for name, shape in param_shapes.items():
        module_path, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_path)
        old = getattr(module, param_name)
        new = torch.empty(tuple(shape), dtype=old.dtype, device=old.device)
        setattr(module, param_name, nn.Parameter(new, requires_grad=old.requires_grad))
        if isinstance(module, nn.Linear) and param_name == "weight":
            module.out_features, module.in_features = shape
    for module_path, attrs in module_attrs.items():
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise ValueError(f"vlmcompress.module_attrs names {module_path!r}, which is not a module of this "
                             f"{type(model).__name__}; the checkpoint does not match its config") from None
        for attr, value in attrs.items():
            set_dotted_attr(module, attr, value)


def _fused_attention_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    from .reduction import attention_with_metric

    return attention_with_metric(self, hidden_states, None)[0], None


def patch_fused_attention(model: nn.Module, param_shapes: dict[str, list[int]]) -> None:
    """Give pruned fused-`qkv` attention modules (BLIP, BLIP-2 vision) a forward that works with fewer heads.

    Modifications: the stock forward reshapes with `embed_dim // num_heads`; this one uses the module's `head_dim`.
    """
    for name in param_shapes:
        if not name.endswith(".qkv.weight"):
            continue
        swap_forward(model.get_submodule(name[: -len(".qkv.weight")]), _fused_attention_forward, "Pruned")
