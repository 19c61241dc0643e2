"""LLaVA-PruMerge (Shang et al., 2024), `algorithm: prumerge`: at the output of LLaVA's feature layer keep the patches
whose class-token attention is an outlier (`mode: adaptive`, IQR per image, so the count depends on the image) or
the most attended ones (`mode: fixed`); each kept patch absorbs its `neighbours` most key-similar patches weighted by
their attention, and one extra token sums the dropped patches. `plus: true` is PruMerge+ (adaptive: every stride
point of the image that is not an outlier is added, so the count varies per image and a batch is padded).

Variant 2 follows the paper's code (42Shawn/LLaVA-PruMerge): the class attention is one softmax over the full-width
`q_cls · kᵀ · C^-0.5` of the layer *after* the feature layer applied to the feature layer's output (`attention_layer`;
the feature layer itself when it is the last), whose keys also choose the neighbours, and the kept patches come in
descending attention (`order: raster` keeps raster order). Variant 1 checkpoints keep their computation
(`_reduce_variant_1`).
"""

from __future__ import annotations

import math

import torch

from .llava_tokens import feature_layer_internals, kept_sources, place_tokens
from .reduction import AttentionInternals, Reducer, ReductionState, register_reducer
from .token_ops import compute_dtype, gather_tokens


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
    flat = values.detach().to(compute_dtype(values)).flatten()
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
        attn = cls_attention.to(compute_dtype(cls_attention)).clamp(0, 1)
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
        keep (`torch.Tensor` of shape `(batch_size, k)`): patch indices, distinct ([`prumerge_keep_index`],
            [`prumerge_plus_index`]).
        neighbours (`int`, *optional*, defaults to 32): clamped to `num_tokens - 2` (all other patches).
        extra_token (`bool`, *optional*, defaults to `True`): append the attention-weighted sum of the dropped
            patches.

    Returns:
        `torch.Tensor` of shape `(batch_size, 1 + k + extra_token, dim)`: `[class token, kept patches in the order of
        `keep`, extra token]`. Neighbours are chosen among all other patches, kept or not (cosine similarity).
    """
    dtype = compute_dtype(hidden_states, cls_attention, keys)
    x = hidden_states[:, 1:].to(dtype)
    attn = cls_attention[:, 1:].to(dtype)
    batch_size, num_patches, _ = x.shape
    k = keep.shape[1]
    m = max(0, min(int(neighbours), num_patches - 1))
    weights = torch.zeros(batch_size, k, num_patches, dtype=dtype, device=x.device)
    if m > 0:
        with torch.no_grad():
            key = keys[:, 1:].to(dtype)
            unit = key / key.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
            sim = gather_tokens(unit, keep) @ unit.transpose(1, 2)  # [B, k, P]
            sim.scatter_(2, keep[..., None], -math.inf)  # a patch is not its own neighbour
            near = sim.topk(m, dim=-1).indices  # [B, k, m]
        weights = weights.scatter(2, near, attn[:, None, :].expand(-1, k, -1).gather(2, near))
    parts = [hidden_states[:, :1], (gather_tokens(x, keep) + weights @ x).to(hidden_states.dtype)]
    if extra_token:
        dropped = torch.ones_like(attn).scatter(1, keep, 0.0)
        parts.append(((attn * dropped)[:, None, :] @ x).to(hidden_states.dtype))
    return torch.cat(parts, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# the paper's selection (variant 2): 42Shawn/LLaVA-PruMerge `llava/model/multimodal_encoder/clip_encoder.py`


def prumerge_class_attention(query: torch.Tensor, keys: torch.Tensor, width: int) -> torch.Tensor:
    """
    PruMerge's class attention: one softmax over the full-width logits `q_cls · kᵀ · width^-0.5` (all heads at once,
    not a mean of per-head softmaxes).

    Args:
        query (`torch.Tensor` of shape `(batch_size, 1, channels)`): the class token's query (`q_proj` output).
        keys (`torch.Tensor` of shape `(batch_size, num_tokens, channels)`): every token's key (`k_proj` output).
        width (`int`): the hidden width `C` of the scale `C^-0.5` (the tower's hidden size).

    Returns:
        `torch.Tensor` of shape `(batch_size, num_tokens)` in `compute_dtype`, rows summing to 1.
    """
    dtype = compute_dtype(query, keys)
    logits = (query.to(dtype) @ keys.to(dtype).transpose(1, 2))[:, 0] * width ** -0.5
    return logits.softmax(dim=-1)


def query_and_keys(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class-token query `[B, 1, C]`, keys `[B, N, C]`) of `layer`'s attention applied to `x` `[B, N, D]` (after
    the layer's `layer_norm1`, as a forward hook on its `q_proj` / `k_proj` sees them)."""
    h = layer.layer_norm1(x)
    attn = layer.self_attn
    return attn.q_proj(h[:, :1]), attn.k_proj(h)


def adaptive_keep_count(values: torch.Tensor) -> tuple[int, float]:
    """
    PruMerge's adaptive count for one image: `ratio` = the fraction of its patches whose class attention is above
    `Q3 + 1.5 · IQR` (linear-interpolated quartiles, as `np.percentile`), and `int(P · ratio)` patches kept.

    Args:
        values (`torch.Tensor` of shape `(num_patches,)`): the class token's attention to each patch.

    Returns:
        `(count, ratio)`; count may be 0.
    """
    flat = values.detach().to(torch.float32)  # the reference converts to float32 numpy
    q1, q3 = torch.quantile(flat, torch.tensor([0.25, 0.75], device=flat.device))
    ratio = int((flat > q3 + 1.5 * (q3 - q1)).sum()) / flat.numel()
    return int(flat.numel() * ratio), ratio


def prumerge_plus_points(ratio: float, num_patches: int) -> list[int]:
    """PruMerge+'s spatially uniform patches for one image: `range(0, num_patches - 1, stride)` with stride
    `max(1, int(int(1 / ratio) / 3))` (the reference: `arange(0, 575, int(step_length / 3))` for 576 patches, whose
    stride is 0 when `1 / ratio < 3`). No outliers (`ratio == 0`) leave no stride: the first patch alone."""
    if ratio <= 0:
        return [0]
    return list(range(0, num_patches - 1, max(1, int(int(1 / ratio) / 3))))


def paper_keep_index(attn: torch.Tensor, count: int, points: list[int] | None = None,
                     raster: bool = False) -> torch.Tensor:
    """
    Patches one image keeps: the `count` most attended in descending attention (the reference's `topk`; equal
    attention: the earlier patch first), then PruMerge+'s `points` that are not among them, in raster order.

    Args:
        attn (`torch.Tensor` of shape `(num_patches,)`): class attention to each patch.
        count (`int`): outliers kept. points (`list[int]`, *optional*): PruMerge+'s stride points.
        raster (`bool`, *optional*, defaults to `False`): return the patches in raster order instead (a knob).

    Returns:
        `torch.Tensor` of shape `(k,)`, long.
    """
    top = attn.argsort(descending=True, stable=True)[:count]
    if points:
        chosen = set(top.tolist())
        extra = torch.tensor([p for p in points if p not in chosen], dtype=torch.long, device=attn.device)
        top = torch.cat([top, extra])
    return top.sort().values if raster else top


def attention_order(keep: torch.Tensor, attn: torch.Tensor, num_outliers: int) -> torch.Tensor:
    """`keep` `[B, k]` (ascending) reordered as the paper returns it: the `num_outliers` most attended first, in
    descending attention, then the others in raster order (static shapes: the fixed mode is exportable)."""
    a = attn.gather(1, keep)
    outlier = torch.zeros_like(keep, dtype=torch.bool).scatter(
        1, a.argsort(dim=1, descending=True, stable=True)[:, :num_outliers], True)
    # outliers score 2 + attention (attention <= 1), the others 1 - their raster rank: one descending sort
    rank = torch.arange(keep.shape[1], device=keep.device, dtype=a.dtype).expand_as(a) / (keep.shape[1] + 1)
    key = torch.where(outlier, 2 + a.clamp(0, 1), 1 - rank)
    return keep.gather(1, key.argsort(dim=1, descending=True, stable=True))


def _sources(keep: torch.Tensor, num_patches: int, extra_token: bool) -> torch.Tensor:
    """`[B, 1 + k (+ 1)]` input index of each output token: CLS, the kept patches, the extra token at the first
    dropped patch."""
    source = [torch.zeros_like(keep[:, :1]), keep + 1]
    if extra_token:  # it sums the dropped patches: it stands where the first dropped patch stood
        dropped = torch.ones(keep.shape[0], num_patches, dtype=torch.int8, device=keep.device).scatter(1, keep, 0)
        source.append(dropped.argmax(dim=1, keepdim=True) + 1)
    return torch.cat(source, dim=1)


def reduce_prumerge(layer, x, internals: AttentionInternals, state: ReductionState, r: int) -> torch.Tensor:
    """PruMerge(+) at the feature layer `options["layer"]`: outliers of the class-token attention (adaptive: IQR per
    image; fixed: a given count), each absorbing its key-similar neighbours, plus the extra token (variant 2, the
    paper's; variant 1: `_reduce_variant_1`)."""
    o = state.options
    if len(state.tokens) != o["layer"]:
        return x
    if state.variant < 2:
        return _reduce_variant_1(layer, x, internals, state)
    b, n, _ = x.shape
    after = o["attention_layer"]
    if after != o["layer"]:  # the paper hooks layer 23's q_proj / k_proj for LLaVA's feature layer 22
        query, keys = query_and_keys(state.layers[after], x)
    else:  # the feature layer is the last: its own projections (the stage says so)
        query = internals.queries[:, :, :1].transpose(1, 2).reshape(b, 1, -1)
        keys = internals.keys.transpose(1, 2).reshape(b, n, -1)
    cls = prumerge_class_attention(query, keys, x.shape[-1])
    attn = cls[:, 1:]
    raster = o.get("order") == "raster"
    # at most as many image tokens as the processor writes placeholders (one per patch): the extra token takes one
    limit = n - 1 - int(o["extra_token"])
    if o["mode"] != "adaptive":
        keep = prumerge_keep_index(attn, min(o["outliers"], limit), min(o["selected"], limit))
        if not raster:
            keep = attention_order(keep, attn, min(o["outliers"], limit))
        out = prumerge_merge(x, cls, keys, keep, o["neighbours"], o["extra_token"])
        return place_tokens(out, _sources(keep, n - 1, o["extra_token"]), state)
    rows, sources = [], []
    for i in range(b):  # each image alone: its own outliers, its own count
        count, ratio = adaptive_keep_count(attn[i])
        points = prumerge_plus_points(ratio, n - 1) if o["plus"] else None
        keep = paper_keep_index(attn[i], min(count, limit), points, raster)[:limit][None]
        rows.append(prumerge_merge(x[i:i + 1], cls[i:i + 1], keys[i:i + 1], keep, o["neighbours"], o["extra_token"]))
        sources.append(_sources(keep, n - 1, o["extra_token"]))
    return place_rows(rows, sources, state, n)


def place_rows(rows: list[torch.Tensor], sources: list[torch.Tensor], state: ReductionState, n: int) -> torch.Tensor:
    """Rows `[1, T_i, D]` of different lengths → `[B, max T_i, D]`, padded at the end with zeros whose source is the
    sentinel `n` (so that `keep_positions` orders them last); `state.row_tokens` holds each row's `T_i`."""
    longest = max(r.shape[1] for r in rows)
    lengths = [r.shape[1] for r in rows]
    x = torch.cat([torch.nn.functional.pad(r, (0, 0, 0, longest - r.shape[1])) for r in rows])
    source = torch.cat([torch.nn.functional.pad(s, (0, longest - s.shape[1]), value=n) for s in sources])
    x = place_tokens(x, source, state)
    if len(set(lengths)) > 1:
        state.row_tokens = torch.tensor(lengths, device=x.device)
    return x


def _reduce_variant_1(layer, x, internals: AttentionInternals, state: ReductionState) -> torch.Tensor:
    """What checkpoints of variant 1 compute: class attention of the feature layer itself (mean of per-head
    softmaxes), one count for the whole batch (IQR over the flattened batch, at least 1), PruMerge+ as 4 × the
    outliers filled from a uniform stride, kept patches in raster order, neighbours by the feature layer's keys."""
    o = state.options
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
    return place_tokens(x, _sources(keep, n - 1, o["extra_token"]), state)


# the adaptive mode chooses the token count per image: its block says `data_dependent`, which keeps it out of
# fixed-shape exports
def prumerge_scoring_flops(n: int, r: int, shape, options: dict) -> int:
    """FLOPs of the fixed mode at the feature layer (`n` tokens, `P = n - 1` patches, `k` kept): the class query and
    the keys of the layer after it (`attention_layer`, when it is another layer) and their logits row, the neighbour
    search on full-width keys `[k, P]`, the weighted merge `[k, P] @ [P, D]` and the extra token `[1, P] @ [P, D]`."""
    patches = n - 1
    k = options["selected"]
    if options.get("keep_positions") and options["extra_token"]:
        k = min(k, n - 2)
    neighbours = max(0, min(options["neighbours"], patches - 1))
    total = 2 * k * patches * shape.d_model + 2 * n * shape.width
    if options["attention_layer"] != options["layer"]:
        total += 2 * (1 + n) * shape.d_model * shape.width
    if neighbours > 0:
        total += 2 * k * patches * shape.width
    if options["extra_token"]:
        total += 2 * patches * shape.d_model
    return total


REDUCER = register_reducer(Reducer("prumerge", reduce_prumerge, after_mlp=True,
                                   sources=kept_sources, scoring_flops=prumerge_scoring_flops))
