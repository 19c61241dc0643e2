"""CrossGET (Shi et al., ICML 2024), `algorithm: crossget`: complete-graph soft matching guided by a cross token,
importance-weighted ensemble, order kept; on vision towers and on the text towers of CLIP / SigLIP (methods.md §3b),
with the CLIP rules or, on LLaVA's vision tower, the LLaVA rules of the paper's code (`options.scoring`).

The cross token is a learned per-layer parameter (`vlmc_cross_token`, zero-initialised until a training stage
learns it), declared through the reducer's `setup_layer` hook: `enter_layer` appends it (plus the previous layer's
cross token) to the sequence, where it is protected, and `leave_layer` takes it off again.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .reduction import AttentionInternals, Reducer, ReductionState, register_reducer
from .token_ops import compute_dtype


def complete_graph_soft_matching(
    metric: torch.Tensor,
    importance: torch.Tensor,
    r: int,
    protected: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
    num_protected: int | None = None,
) -> tuple[Callable, torch.Tensor, torch.Tensor] | None:
    """
    CrossGET's complete-graph soft matching with cross-guided importance and weighted ensemble.

    Every token may be merged into any other (not only across an A/B split). A token is redundant when it is very
    similar to a token ranked after it (tokens are ranked by their best similarity, so the mutual best pair merges
    once, not twice); the `r` tokens with the lowest `importance - redundancy` are merged into their most similar
    surviving token with weights `softmax([importance_src, importance_dst])`. Survivors keep their original order.

    Args:
        metric (`torch.Tensor` of shape `(batch_size, num_tokens, channels)`): features compared by cosine similarity
            (CrossGET uses the keys, all heads concatenated).
        importance (`torch.Tensor` of shape `(batch_size, num_tokens)`): how much the cross token cares about each
            token (cosine of its key with the cross token's query).
        r (`int`): tokens to remove; clamped to `(num_tokens - max protected per row) // 2`.
        protected (`torch.Tensor` of shape `(batch_size, num_tokens)`, bool, *optional*): tokens that are never
            merged and never receive others (class / cross / end-of-text tokens).
        group (`torch.Tensor` of shape `(batch_size, num_tokens)`, int, *optional*): tokens only merge within their
            group (e.g. real tokens vs padding).
        num_protected (`int`, *optional*): the most protected tokens in a row, when the caller knows it (saves reading
            it from `protected`, which would make the token count data-dependent for `torch.export`).

    Returns:
        `None` when nothing is merged, else `(merge, kept, old_to_new)`:
        - `merge(x, size) -> (x, size)`: `x` `(batch_size, num_tokens, dim)` and `size` `(batch_size, num_tokens, 1)`
          (all ones when None) to `(batch_size, num_tokens - r, ...)`; a merged token becomes
          `(2 w_src s_src x_src + 2 w_dst s_dst x_dst) / (s_src + s_dst)` (the size-weighted mean when the weights are
          equal) and its size the sum.
        - `kept`: `(batch_size, num_tokens - r)` original indices of the surviving tokens, ascending.
        - `old_to_new`: `(batch_size, num_tokens)` index in the merged sequence that each input token ends up in.
    """
    batch_size, num_tokens, _ = metric.shape
    if num_protected is None:
        num_protected = int(protected.sum(dim=-1).max()) if protected is not None else 0
    r = min(r, (num_tokens - num_protected) // 2)
    if r <= 0:
        return None

    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)
        sim = unit @ unit.transpose(-1, -2)  # [B, N, N]
        allowed = ~torch.eye(num_tokens, dtype=torch.bool, device=metric.device)[None]
        if protected is not None:
            allowed = allowed & ~protected[:, :, None] & ~protected[:, None, :]
        if group is not None:
            allowed = allowed & (group[:, :, None] == group[:, None, :])
        sim = sim.masked_fill(~allowed, -math.inf)

        # rank tokens by their best similarity; a token is redundant through its best partner ranked after it
        best = sim.max(dim=-1).values
        rank = best.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # [B, N] position in the ranking
        later = rank[:, None, :] > rank[:, :, None]  # [B, N, N]: j is ranked after i
        redundancy = sim.masked_fill(~later, -math.inf).max(dim=-1).values
        score = importance.to(sim.dtype) - redundancy  # +inf for protected and last-ranked tokens: never sources
        if protected is not None:
            score = score.masked_fill(protected, math.inf)
        order = score.argsort(dim=-1, stable=True)
        src = order[:, :r]  # [B, r]
        survivor = torch.ones(batch_size, num_tokens, dtype=torch.bool, device=metric.device)
        survivor.scatter_(1, src, False)

        src_sim = sim.gather(1, src[..., None].expand(batch_size, r, num_tokens))  # [B, r, N]
        to_survivor = src_sim.masked_fill(~survivor[:, None, :], -math.inf)
        # a source whose allowed partners were all merged away falls back to its most similar unprotected survivor
        fallback = (unit.gather(1, src[..., None].expand(-1, -1, unit.shape[-1])) @ unit.transpose(-1, -2))
        ok = survivor if protected is None else survivor & ~protected
        fallback = fallback.masked_fill(~ok[:, None, :], -math.inf)
        stuck = torch.isinf(to_survivor.max(dim=-1).values)[..., None]
        dst = torch.where(stuck, fallback, to_survivor).argmax(dim=-1)  # [B, r]

        weights = torch.stack([importance.gather(1, src), importance.gather(1, dst)], dim=-1)
        weights = weights.to(compute_dtype(weights)).softmax(-1)
        # survivors' indices, ascending per row (a sort rather than nonzero() keeps the shape static for export)
        kept = survivor.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, :num_tokens - r].sort(-1).values
        new_index = torch.zeros(batch_size, num_tokens, dtype=torch.long, device=metric.device)
        new_index.scatter_(1, kept, torch.arange(num_tokens - r, device=metric.device).expand(batch_size, -1))
        old_to_new = new_index.scatter(1, src, new_index.gather(1, dst))

    def merge(x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if size is None:
            size = torch.ones_like(x[..., :1])
        w = weights.to(x.dtype)
        y = x * size
        dim = x.shape[-1]
        y_src = y.gather(1, src[..., None].expand(-1, -1, dim))
        y_dst = y.gather(1, dst[..., None].expand(-1, -1, dim))
        y = y.scatter_add(1, dst[..., None].expand(-1, -1, dim), 2 * w[..., :1] * y_src + (2 * w[..., 1:] - 1) * y_dst)
        size = size.scatter_add(1, dst[..., None], size.gather(1, src[..., None]))
        y = y.gather(1, kept[..., None].expand(-1, -1, dim))
        size = size.gather(1, kept[..., None])
        return y / size, size

    return merge, kept, old_to_new


# ----------------------------------------------------------------------------------------------------------------
# the reducer and its cross token


def initial_cross_token(x: torch.Tensor, state: ReductionState) -> torch.Tensor:
    """CrossGET's cross token before the first layer `[B, 1, D]`: a copy of the class token (vision), of the
    end-of-text token (text), or the mean token (a vision tower without a class token)."""
    if state.text is not None:
        return x[state.eot][:, None]
    return x[:, :1] if state.class_token else x.mean(dim=1, keepdim=True)


def add_cross_token_parameter(layer: nn.Module) -> None:
    """CrossGET's per-layer cross token `[D]`, zero-initialised (learned by a later stage); saved in the state dict."""
    if "vlmc_cross_token" in layer._parameters:
        return
    weight = layer.layer_norm1.weight
    width = layer.layer_norm1.normalized_shape[0]
    layer.register_parameter("vlmc_cross_token", nn.Parameter(torch.zeros(width, dtype=weight.dtype,
                                                                          device=weight.device)))


def append_cross_token(layer: nn.Module, x: torch.Tensor, state: ReductionState) -> torch.Tensor:
    """`[B, N, D]` → `[B, N + 1, D]`: the previous layer's cross token plus this layer's learned offset at the end."""
    if state.size is None:
        state.size = torch.ones_like(x[..., :1])
    if state.cross is None:
        state.cross = initial_cross_token(x, state)
    x = torch.cat([x, state.cross.detach() + layer.vlmc_cross_token.to(x.dtype)], dim=1)
    state.size = torch.cat([state.size, torch.ones_like(state.size[:, :1])], dim=1)
    if state.valid is not None:
        state.valid = torch.cat([state.valid, state.valid.new_ones(x.shape[0], 1)], dim=1)
    return x


def remove_cross_token(layer: nn.Module, x: torch.Tensor, state: ReductionState) -> torch.Tensor:
    """`[B, N + 1, D]` → `[B, N, D]`, keeping the cross token in `state.cross` for the next layer."""
    state.cross, x = x[:, -1:], x[:, :-1]
    state.size = state.size[:, :-1]
    if state.valid is not None:
        state.valid = state.valid[:, :-1]
    return x


def received_attention_importance(queries: torch.Tensor, keys: torch.Tensor, scale: float,
                                  bias: torch.Tensor | None) -> torch.Tensor:
    """
    CrossGET's importance on LLaVA's vision tower (sdc17/CrossGET `LLaVA/llava/model/reducer.py`): the attention
    each token receives, averaged over the queries other than the cross token (the last), plus the attention it
    receives from the cross token, with the attention averaged over heads.

    Args:
        queries, keys (`torch.Tensor` of shape `(batch_size, heads, num_tokens, head_dim)`): the layer's projections.
        scale (`float`): the attention scale. bias (`torch.Tensor`, *optional*): the additive attention bias
            (proportional attention's `log(size)`), broadcastable to `(batch_size, heads, num_tokens, num_tokens)`.

    Returns:
        `torch.Tensor` of shape `(batch_size, num_tokens)` in `compute_dtype`.
    """
    dtype = compute_dtype(queries, keys)
    logits = (queries.to(dtype) @ keys.to(dtype).transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.to(dtype)
    attn = logits.softmax(dim=-1).mean(dim=1)  # [B, queries, keys]
    return attn[:, :-1].mean(dim=1) + attn[:, -1]


def reduce_crossget(layer, x, internals: AttentionInternals, state: ReductionState, r: int) -> torch.Tensor:
    """CrossGET (methods.md §3b): complete-graph matching, weighted ensemble, order kept; `x` ends with the cross
    token, which is protected like the class / end-of-text tokens. Two rule sets, as the paper's code:
    `scoring: clip` (CLIP / SigLIP; the default of blocks without one) matches full-width keys and scores each
    token by the cosine of its key with the cross token's query (the end-of-text token's query on text towers);
    `scoring: llava` (LLaVA's vision tower) matches keys averaged over heads and scores each token by the attention
    it receives ([`received_attention_importance`])."""
    if r <= 0:
        return x
    b, n, _ = x.shape
    protected = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    protected[:, -1] = True  # the cross token
    if state.text is None and state.options.get("scoring") == "llava":
        protected[:, 0] |= state.class_token
        keys = internals.keys.mean(dim=1)  # [B, N, head_dim]
        importance = received_attention_importance(internals.queries, internals.keys, internals.scale,
                                                   internals.bias)
    else:
        keys = internals.keys.transpose(1, 2).reshape(b, n, -1)  # [B, N, D]: full-width keys
        queries = internals.queries.transpose(1, 2).reshape(b, n, -1)
        if state.text is not None:
            protected[:, :-1] |= state.eot
            protected[:, 0] = True  # begin-of-text
            guide = queries[:, :-1][state.eot][:, None]  # [B, 1, D] the end-of-text query
        else:
            protected[:, 0] |= state.class_token
            guide = queries[:, -1:]
        dtype = compute_dtype(keys, guide)
        importance = (F.normalize(keys.to(dtype), dim=-1) @ F.normalize(guide.to(dtype), dim=-1).transpose(1, 2))[..., 0]
    group = None
    if state.valid is not None:
        group = (~state.valid).long()
        # padding carries nothing: merge it (among itself) before any text token
        importance = importance.masked_fill(~state.valid, -1e4)
    num_protected = 3 if state.text is not None else 1 + int(state.class_token)
    matched = complete_graph_soft_matching(keys, importance, r, protected=protected, group=group,
                                           num_protected=num_protected)
    if matched is None:
        return x
    merge, kept, old_to_new = matched
    x, state.size = merge(x, state.size)
    if state.valid is not None:
        state.valid = state.valid.gather(1, kept)
    if state.eot is not None:
        state.eot = state.eot.gather(1, kept[:, :-1])  # the cross token (last) stays last and is not text
    if state.old_to_new is not None:
        state.old_to_new = old_to_new[:, :-1].gather(1, state.old_to_new)
    return x


def crossget_scoring_flops(n: int, r: int, shape, options: dict) -> int:
    """FLOPs of CrossGET's scoring for `n` tokens (the cross token included). CLIP rules, at full key width: the
    importance (`n` keys against one guide query), the complete graph (`n × n`) and the fallback rows (`r × n`).
    LLaVA rules: the attention probabilities again (`q · kᵀ`, `n × n` at full width; the layer's own attention runs
    fused), then the graph and the fallback rows on head-averaged keys."""
    if options.get("scoring") == "llava":
        return 2 * n * n * shape.width + 2 * n * n * shape.head_dim + 2 * r * n * shape.head_dim
    return 2 * n * shape.width + 2 * n * n * shape.width + 2 * r * n * shape.width


def crossget_sources(state: ReductionState) -> torch.Tensor | None:
    """`[B, N', N0]` bool from the merge map every input token followed (`state.old_to_new`)."""
    if state.old_to_new is None or not state.tokens:
        return None
    return F.one_hot(state.old_to_new, state.tokens[-1]).transpose(1, 2).bool()


REDUCER = register_reducer(Reducer("crossget", reduce_crossget, order_preserving=True, added_tokens=1,
                                   sources=crossget_sources, scoring_flops=crossget_scoring_flops,
                                   setup_layer=add_cross_token_parameter, enter_layer=append_cross_token,
                                   leave_layer=remove_cross_token))
