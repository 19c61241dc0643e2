"""LLaVA-PruMerge (Shang et al., 2024), `algorithm: prumerge`: at the output of LLaVA's feature layer keep the patches
whose class-token attention is an outlier (`mode: adaptive`, IQR over the batch, so the count depends on the
images) or the most attended ones (`mode: fixed`); each kept patch absorbs its `neighbours` most key-similar patches
weighted by their attention, and one extra token sums the dropped patches. `plus: true` is PruMerge+.
"""

from __future__ import annotations

import math

import torch

from .llava_tokens import feature_layer_internals, kept_sources, place_tokens
from .reduction import AttentionInternals, Reducer, ReductionState, register_reducer
from .token_ops import gather_tokens


def iqr_outlier_count(values: torch.Tensor) -> int:
    """
    PruMerge's adaptive token count: how many values of the whole batch are outliers (above `Q3 + 1.5 * IQR` of all
    values, linear-interpolated quartiles), divided by the batch size (rounded down, at least 1).

    The count is computed over the flattened batch, as in the reference code, so every sample keeps the same number of
    tokens; a sample's count therefore depends on the other samples of its batch.

    Args:
        values (`torch.Tensor` of shape `(batch_size, num_patches)`): the class token's attention to each patch.

    Returns:
        `int` in `[1, num_patches]`.
    """
    flat = values.detach().float().flatten()
    q1, q3 = torch.quantile(flat, torch.tensor([0.25, 0.75], device=flat.device))
    outliers = int((flat > q3 + 1.5 * (q3 - q1)).sum())
    return max(1, min(values.shape[1], outliers // values.shape[0]))


def prumerge_keep_index(cls_attention: torch.Tensor, num_outliers: int, num_total: int | None = None) -> torch.Tensor:
    """
    Patches PruMerge keeps: the `num_outliers` most attended; PruMerge+ (`num_total > num_outliers`) fills up to
    `num_total` with patches on a uniform stride `max(1, num_patches // (num_total - num_outliers))` over the raster
    order, then (if the stride points run out) with the next most attended patches.

    Args:
        cls_attention (`torch.Tensor` of shape `(batch_size, num_patches)`): class-token attention to each patch.
        num_outliers (`int`): the most attended patches kept (e.g. [`iqr_outlier_count`]).
        num_total (`int`, *optional*): patches kept in all; `num_outliers` when None. Clamped to `num_patches`.

    Returns:
        `torch.Tensor` of shape `(batch_size, num_total)`, long, ascending patch indices (0 = first patch, the class
        token excluded). Equal attention goes to the earlier patch.
    """
    batch_size, num_patches = cls_attention.shape
    num_total = min(num_patches, num_outliers if num_total is None else num_total)
    num_outliers = max(0, min(num_outliers, num_total))
    with torch.no_grad():
        attn = cls_attention.float().clamp(0, 1)
        rank = attn.argsort(dim=1, descending=True, stable=True)
        # tiers 4 (outliers) > 2 (stride points) > 0 (the rest); attention in [0, 1] orders tokens within a tier
        tier = torch.zeros_like(attn).scatter(1, rank[:, :num_outliers], 4.0)
        extra = num_total - num_outliers
        if extra > 0:
            grid = torch.arange(0, num_patches, max(1, num_patches // extra), device=attn.device)
            tier[:, grid] = tier[:, grid].clamp_min(2.0)
        order = (tier + attn).argsort(dim=1, descending=True, stable=True)
        return order[:, :num_total].sort(dim=1).values


def prumerge_merge(
    hidden_states: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    keep: torch.Tensor,
    neighbours: int = 32,
    extra_token: bool = True,
) -> torch.Tensor:
    """
    PruMerge's merge: every kept patch `i` absorbs its `neighbours` most key-similar other patches `j`, weighted by
    their class-token attention: `x_i + sum_j a_j x_j`; the optional extra token is `sum_j a_j x_j` over the patches
    not kept.

    Args:
        hidden_states (`torch.Tensor` of shape `(batch_size, num_tokens, dim)`): index 0 is the class token.
        cls_attention (`torch.Tensor` of shape `(batch_size, num_tokens)`): class-token attention to every token.
        keys (`torch.Tensor` of shape `(batch_size, num_tokens, channels)`): the feature layer's keys.
        keep (`torch.Tensor` of shape `(batch_size, k)`): ascending patch indices ([`prumerge_keep_index`]).
        neighbours (`int`, *optional*, defaults to 32): clamped to `num_tokens - 2` (all other patches).
        extra_token (`bool`, *optional*, defaults to `True`): append the attention-weighted sum of the dropped
            patches.

    Returns:
        `torch.Tensor` of shape `(batch_size, 1 + k + extra_token, dim)`: `[class token, kept patches in original
        order, extra token]`. Neighbours are chosen among all other patches, kept or not (cosine similarity).
    """
    x = hidden_states[:, 1:].float()
    attn = cls_attention[:, 1:].float()
    batch_size, num_patches, _ = x.shape
    k = keep.shape[1]
    m = max(0, min(int(neighbours), num_patches - 1))
    weights = torch.zeros(batch_size, k, num_patches, device=x.device)
    if m > 0:
        with torch.no_grad():
            unit = keys[:, 1:].float() / keys[:, 1:].float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
            sim = gather_tokens(unit, keep) @ unit.transpose(1, 2)  # [B, k, P]
            sim.scatter_(2, keep[..., None], -math.inf)  # a patch is not its own neighbour
            near = sim.topk(m, dim=-1).indices  # [B, k, m]
        weights = weights.scatter(2, near, attn[:, None, :].expand(-1, k, -1).gather(2, near))
    parts = [hidden_states[:, :1], (gather_tokens(x, keep) + weights @ x).to(hidden_states.dtype)]
    if extra_token:
        dropped = torch.ones_like(attn).scatter(1, keep, 0.0)
        parts.append(((attn * dropped)[:, None, :] @ x).to(hidden_states.dtype))
    return torch.cat(parts, dim=1)


def reduce_prumerge(layer, x, internals: AttentionInternals, state: ReductionState, r: int) -> torch.Tensor:
    """PruMerge(+) at the feature layer `options["layer"]`: outliers of the class-token attention (adaptive: IQR
    over the batch; fixed: a given count), each absorbing its key-similar neighbours, plus the extra token."""
    o = state.options
    if len(state.tokens) != o["layer"]:
        return x
    cls, keys = feature_layer_internals(layer, internals, state)
    b, _, n, _ = keys.shape
    attn = cls[:, 1:]
    if o["mode"] == "adaptive":
        outliers = iqr_outlier_count(attn)
        total = min(n - 1, 4 * outliers) if o["plus"] else outliers  # PruMerge+: about 3 stride points per outlier
    else:
        outliers, total = o["outliers"], o["selected"]
    if o.get("keep_positions") and o["extra_token"]:
        # the extra token needs a free position: at least one patch must be dropped
        outliers, total = min(outliers, n - 2), min(total, n - 2)
    keep = prumerge_keep_index(attn, outliers, total)
    full_keys = keys.transpose(1, 2).reshape(b, n, -1)  # PruMerge compares full-width keys
    x = prumerge_merge(x, cls, full_keys, keep, o["neighbours"], o["extra_token"])
    source = [torch.zeros_like(keep[:, :1]), keep + 1]
    if o["extra_token"]:  # it sums the dropped patches: it stands where the first dropped patch stood
        dropped = torch.ones_like(attn, dtype=torch.int8).scatter(1, keep, 0)
        source.append(dropped.argmax(dim=1, keepdim=True) + 1)
    return place_tokens(x, torch.cat(source, dim=1), state)


# the adaptive mode chooses the token count per batch: its block says `data_dependent`, which keeps it out of
# fixed-shape exports
def prumerge_scoring_flops(n: int, r: int, shape, options: dict) -> int:
    """FLOPs of the fixed mode at the feature layer (`n` tokens, `P = n - 1` patches, `k` kept): the neighbour
    search on full-width keys `[k, P]`, the weighted merge `[k, P] @ [P, D]` and the extra token `[1, P] @ [P, D]`."""
    patches = n - 1
    k = options["selected"]
    if options.get("keep_positions") and options["extra_token"]:
        k = min(k, n - 2)
    neighbours = max(0, min(options["neighbours"], patches - 1))
    total = 2 * k * patches * shape.d_model
    if neighbours > 0:
        total += 2 * k * patches * shape.width
    if options["extra_token"]:
        total += 2 * patches * shape.d_model
    return total


REDUCER = register_reducer(Reducer("prumerge", reduce_prumerge, cls_attention=True, after_mlp=True,
                                   sources=kept_sources, scoring_flops=prumerge_scoring_flops))
