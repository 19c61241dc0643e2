"""The pruning kernels of `structured_prune`: head and neuron importance under a chosen importance, the global or
per-layer ranking, and the removal itself (torch-pruning's channel surgery on the coupled projections)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...adapters import AttentionUnit, MlpUnit, get_submodule
from ...integrations import torch_pruning as tpi
from ...modeling.shapes import set_dotted_attr

# a per-element importance: a weight or bias → a tensor of its shape (the chosen importance's `element_score`)
Score = Callable[[torch.Tensor], torch.Tensor]


def _rows_score(linear: torch.nn.Linear, idxs: list[int], score: Score) -> torch.Tensor:
    s = score(linear.weight)[idxs].sum()
    return s + (score(linear.bias)[idxs].sum() if linear.bias is not None else 0.0)


def _head_groups(unit: AttentionUnit) -> list[dict[str, list[int]]]:
    """Channels of every prunable group of `unit`: one head, or one key/value head with its query heads."""
    per_group = unit.num_heads // unit.num_kv_heads
    groups = []
    for g in range(unit.num_kv_heads):
        q_heads = list(range(g * per_group, (g + 1) * per_group))
        groups.append({"q_heads": q_heads, "kv_heads": [g]})
    return groups


def _group_channels(unit: AttentionUnit, group: dict[str, list[int]]) -> dict[str, list[int]]:
    d = unit.head_dim
    if unit.qkv:
        return {"qkv": tpi.head_channels(group["q_heads"], d, chunks=3, heads_per_chunk=unit.num_heads),
                "out": tpi.head_channels(group["q_heads"], d)}
    return {"q": tpi.head_channels(group["q_heads"], d), "k": tpi.head_channels(group["kv_heads"], d),
            "v": tpi.head_channels(group["kv_heads"], d), "out": tpi.head_channels(group["q_heads"], d)}


@torch.no_grad()
def head_importance(unit: AttentionUnit, score: Score) -> torch.Tensor:
    """`[num_kv_heads]` importance of each head group, summed over every coupled projection: squared L2 norm
    (magnitude) or `Σ |w · grad|` (taylor)."""
    scores = []
    for group in _head_groups(unit):
        ch = _group_channels(unit, group)
        out = get_submodule(unit.module, unit.out)
        s = score(out.weight)[:, ch["out"]].sum()
        for key in ("qkv", "q", "k", "v"):
            if key in ch:
                s = s + _rows_score(get_submodule(unit.module, getattr(unit, key)), ch[key], score)
        scores.append(s)
    return torch.stack(scores).float()


@torch.no_grad()
def neuron_importance(unit: MlpUnit, score: Score) -> torch.Tensor:
    """`[width]` importance of each neuron: its rows in the up projections and column in the down projection."""
    down = get_submodule(unit.module, unit.down)
    s = score(down.weight).sum(dim=0)
    for name in unit.up:
        up = get_submodule(unit.module, name)
        s = s + score(up.weight).sum(dim=1)
        if up.bias is not None:
            s = s + score(up.bias)
    return s.float()


def choose_removals(scores: dict[str, torch.Tensor], ratio: float, global_ranking: bool) -> dict[str, list[int]]:
    """Indices to remove per unit so that `ratio` of all groups go, keeping at least one per unit.

    Scores are divided by their unit's mean first, so one ranking across layers compares like with like.
    """
    normalised = {k: v / v.mean().clamp_min(1e-12) for k, v in scores.items()}
    removals: dict[str, list[int]] = {k: [] for k in scores}
    if global_ranking:
        total = sum(len(v) for v in scores.values())
        budget = int(round(ratio * total))
        flat = sorted((float(s), k, i) for k, v in normalised.items() for i, s in enumerate(v))
        for _, key, idx in flat:
            if budget == 0:
                break
            if len(scores[key]) - len(removals[key]) > 1:
                removals[key].append(idx)
                budget -= 1
    else:
        for key, v in normalised.items():
            n = min(int(round(ratio * len(v))), len(v) - 1)
            removals[key] = v.argsort()[:n].tolist()
    return removals


def remove_heads(unit: AttentionUnit, groups_to_remove: list[int]) -> dict[str, Any]:
    """Cut the channels of the given head groups; returns the module attributes that changed."""
    groups = _head_groups(unit)
    chosen = [groups[g] for g in groups_to_remove]
    merged = {"q_heads": sorted(h for g in chosen for h in g["q_heads"]),
              "kv_heads": sorted(h for g in chosen for h in g["kv_heads"])}
    ch = _group_channels(unit, merged)
    tpi.prune_in_channels(get_submodule(unit.module, unit.out), ch["out"])
    for key in ("qkv", "q", "k", "v"):
        if key in ch:
            tpi.prune_out_channels(get_submodule(unit.module, getattr(unit, key)), ch[key])
    heads = unit.num_heads - len(merged["q_heads"])
    kv_heads = unit.num_kv_heads - len(merged["kv_heads"])
    attrs = {a: heads for a in unit.head_attrs} | {a: kv_heads for a in unit.kv_head_attrs}
    attrs |= {a: heads * unit.head_dim for a in unit.width_attrs}
    for attr, value in attrs.items():
        set_dotted_attr(unit.module, attr, value)
    return attrs


def remove_neurons(unit: MlpUnit, idxs: list[int]) -> dict[str, Any]:
    for name in unit.up:
        tpi.prune_out_channels(get_submodule(unit.module, name), idxs)
    down = get_submodule(unit.module, unit.down)
    tpi.prune_in_channels(down, idxs)
    attrs = {a: down.in_features for a in unit.width_attrs}
    for attr, value in attrs.items():
        set_dotted_attr(unit.module, attr, value)
    return attrs


def _projection_names(unit) -> list[str]:
    if isinstance(unit, AttentionUnit):
        return [p for p in (unit.q, unit.k, unit.v, unit.qkv, unit.out) if p]
    return [*unit.up, unit.down]


def _fix_fused_attention(model, compression) -> None:
    # BLIP / BLIP-2 stock attention infers the head width from the residual width, which is wrong once heads are
    # gone; the modeling code's fused-attention forward uses the recorded head_dim instead
    from ...modeling.shapes import patch_fused_attention

    patch_fused_attention(model, compression["param_shapes"])
