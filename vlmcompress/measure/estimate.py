"""The plan-time FLOPs estimate: what `FlopCounterMode` would count for one sample through a tower, from shapes only
(it works on the meta device, so `validate` and `--dry-run` load no weights).

Counted, exactly as `torch.utils.flop_counter` counts them (2 × multiply-adds; a bias add is free):
    - the patch embedding's convolution (vision towers);
    - per layer, at the tokens each sub-layer really sees: the q/k/v and output projections and the two attention
      matmuls (q·kᵀ, attention·v) at the tokens entering the layer (plus tokens a reducer adds for the layer, such as
      CrossGET's cross token), the MLP's matmuls at the tokens left after the reduction (or entering the layer, for
      a reducer that runs after the MLP: VisionZip, PruMerge), every layer at its own (possibly pruned) widths;
    - the class-token attention row a reducer asks for (2 · N · width) and the matmuls of the reducer's own scoring
      (its `Reducer.scoring_flops`: ToMe's and Turbo's bipartite similarities, CrossGET's complete graph,
      VisionZip's contextual assignment, PruMerge's neighbour search and merge, FastV's last-token attention row).

Left out: what the counter leaves out too (norms, activations, softmax, element-wise ops, gathers, embedding
lookups, rotary embeddings), and what lies outside a tower's layers (the final norm, pooling heads such as SigLIP's
attention pooling, projections, the language model head), BLIP-2's Q-Former, and Turbo's image-token pruning inside
BLIP's text encoder (its cross-attention sees fewer image tokens; the estimate covers self-attention towers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..adapters import get_submodule


@dataclass(frozen=True)
class LayerShape:
    """The widths of one encoder / decoder layer that its matmuls' FLOPs depend on.

    `qkv`: output features of the q, k and v projections together; `width`: the attention's inner width (query
    heads × head dim, the output projection's input); `mlp_width`: the MLP's hidden width; `mlp_matmuls`: its
    projections (2 for fc1 / fc2, 3 for gate / up / down)."""

    d_model: int
    qkv: int
    width: int
    heads: int
    head_dim: int
    mlp_width: int
    mlp_matmuls: int


def layer_shapes(model: nn.Module, adapter, component: str) -> list[LayerShape]:
    """One `LayerShape` per layer of `component`, at the model's current widths."""
    units = [u for u in adapter.attention_units(model) if u.component == component]
    mlps = [u for u in adapter.mlp_units(model) if u.component == component]
    shapes = []
    for unit, mlp in zip(units, mlps):
        out = get_submodule(unit.module, unit.out)
        qkv = (get_submodule(unit.module, unit.qkv).out_features if unit.qkv else
               sum(get_submodule(unit.module, p).out_features for p in (unit.q, unit.k, unit.v)))
        shapes.append(LayerShape(d_model=out.out_features, qkv=qkv, width=out.in_features,
                                 heads=out.in_features // unit.head_dim, head_dim=unit.head_dim,
                                 mlp_width=get_submodule(mlp.module, mlp.down).in_features,
                                 mlp_matmuls=len(mlp.up) + 1))
    return shapes


def attention_flops(shape: LayerShape, n: int) -> int:
    """Projections plus q·kᵀ and attention·v of one layer at `n` tokens."""
    return 2 * n * shape.d_model * shape.qkv + 2 * n * shape.width * shape.d_model + 4 * n * n * shape.width


def mlp_flops(shape: LayerShape, n: int) -> int:
    return 2 * n * shape.d_model * shape.mlp_width * shape.mlp_matmuls


def layer_flops(shape: LayerShape, n_in: int, r: int = 0, reducer=None, options: dict[str, Any] | None = None) -> int:
    """FLOPs of one layer entered by `n_in` tokens, `r` of which leave in it under `reducer` (a modeling `Reducer`,
    or None for a plain layer)."""
    if reducer is None:
        return attention_flops(shape, n_in) + mlp_flops(shape, n_in)
    n = n_in + reducer.added_tokens
    total = attention_flops(shape, n)
    if r > 0:
        if reducer.cls_attention:
            total += 2 * n * shape.width
        if reducer.scoring_flops is not None:
            total += reducer.scoring_flops(n, r, shape, options or {})
    return total + mlp_flops(shape, n if reducer.after_mlp else n - r)


def embedding_flops(model: nn.Module, adapter, component: str) -> int:
    """The patch embedding's convolution(s) of a vision tower, for one image (0 for other towers)."""
    if component != "vision":
        return 0
    tower = get_submodule(model, adapter.component_paths["vision"])
    image = getattr(model.config, "vision_config", model.config).image_size
    total = 0
    for conv in (m for m in tower.modules() if isinstance(m, nn.Conv2d)):
        if conv.padding == "same":
            out_h = out_w = image
        else:
            pad = (0, 0) if conv.padding == "valid" else conv.padding
            out_h = (image + 2 * pad[0] - conv.kernel_size[0]) // conv.stride[0] + 1
            out_w = (image + 2 * pad[1] - conv.kernel_size[1]) // conv.stride[1] + 1
        total += 2 * out_h * out_w * conv.out_channels * conv.in_channels // conv.groups * conv.kernel_size[0] * \
            conv.kernel_size[1]
    return total


def tower_flops(model: nn.Module, adapter, component: str, tokens_in: list[int], r: list[int] | None = None,
                algorithm: str | None = None, options: dict[str, Any] | None = None, extra_tokens: int = 0) -> int:
    """FLOPs of one sample through `component`'s patch embedding and layers; layer i is entered by `tokens_in[i]`
    tokens (+ `extra_tokens`, e.g. the text of a LLaVA prompt) and removes `r[i]` under `algorithm`."""
    reducer = None
    if algorithm is not None:
        from ..modeling.reduction import REDUCERS

        reducer = REDUCERS[algorithm]
    r = r or [0] * len(tokens_in)
    total = embedding_flops(model, adapter, component)
    for shape, n, removed in zip(layer_shapes(model, adapter, component), tokens_in, r):
        total += layer_flops(shape, n + extra_tokens, removed, reducer, options)
    return total


def tower_gflops(model: nn.Module, adapter, component: str, tokens_in: list[int], reducing=None,
                 algorithm: str | None = None, options: dict[str, Any] | None = None, extra_tokens: int = 0) -> float:
    """`tower_flops` in GFLOPs; `reducing` is the tower's `TowerSpec` (its `r` per layer) when reduced."""
    r = None if reducing is None else reducing.r
    return tower_flops(model, adapter, component, tokens_in, r, algorithm if reducing is not None else None,
                       options, extra_tokens) / 1e9
