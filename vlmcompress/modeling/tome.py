"""ToMe (Bolya et al., ICLR 2023), `algorithm: tome`: bipartite soft matching on the keys averaged over heads,
size-weighted merging, proportional attention, the class token never merged (methods.md §1).

Kernels (pure, shapes in the docstrings) and the runtime reducer that the reducing encoder layers of `reduction.py`
call after each layer's attention residual. Typical use inside a transformer block, between attention and MLP:

```python
merge, _ = bipartite_soft_matching(keys.mean(1), r, class_token=True)
hidden_states, size = merge_wavg(merge, hidden_states, size)
```
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .reduction import AttentionInternals, Reducer, ReductionState, register_reducer
from .token_ops import do_nothing, merge_source, merge_wavg


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    class_token: bool = True,
    distill_token: bool = False,
) -> tuple[Callable, Callable]:
    """
    Pairs the `r` most similar tokens with bipartite soft matching and returns functions that merge / unmerge them.

    Tokens are split alternately into a set A (even indices) and a set B (odd indices). Every A token is linked to its
    most similar B token (cosine similarity of `metric`), and the `r` A tokens with the strongest links are merged into
    their B partner. Several A tokens may land in the same B token. The merged sequence is ordered as
    `[unmerged A tokens, all B tokens]`; with `class_token=True` the unmerged A tokens keep their original order, so
    the class token stays at index 0.

    Args:
        metric (`torch.Tensor` of shape `(batch_size, num_tokens, channels)`):
            Features that decide which tokens are similar (ToMe uses the attention keys averaged over heads). Only
            read under `torch.no_grad()`: no gradient flows through the matching.
        r (`int`):
            Number of tokens to remove. Clamped to `(num_tokens - num_protected) // 2`, i.e. at most half of the
            unprotected tokens per call; `r <= 0` returns `(do_nothing, do_nothing)`.
        class_token (`bool`, *optional*, defaults to `True`):
            Whether index 0 is a class token, which is never merged.
        distill_token (`bool`, *optional*, defaults to `False`):
            Whether index 1 is a distillation token (DeiT), which never receives other tokens. It stays in set B, so
            in the merged sequence it sits at index `num_unmerged_a`, not at index 1.

    Returns:
        `tuple[Callable, Callable]`: `(merge, unmerge)`.
        - `merge(x, mode="mean")` maps `x` of shape `(batch_size, num_tokens, dim)` to
          `(batch_size, num_tokens - r, dim)`, reducing merged tokens with `torch.Tensor.scatter_reduce` (`mode` in
          `"sum"`, `"mean"`, `"amax"`, ...). `dim` is free: the same `merge` applies to hidden states, sizes and
          source maps.
        - `unmerge(x)` maps `(batch_size, num_tokens - r, dim)` back to `(batch_size, num_tokens, dim)`: every
          original token takes the value of the merged token it ended up in.
    """
    num_tokens = metric.shape[-2]
    num_protected = int(class_token) + int(distill_token)
    r = min(r, (num_tokens - num_protected) // 2)
    if r <= 0:
        return do_nothing, do_nothing

    with torch.no_grad():
        scores = _bipartite_scores(metric)
        if distill_token:
            # The distillation token is B's first element: no A token may pick it as destination.
            scores[..., :, 0] = -math.inf
    return _bipartite_merge(scores, r, class_token, num_tokens)


def _bipartite_scores(metric: torch.Tensor) -> torch.Tensor:
    """Cosine similarity `[B, ceil(N/2), floor(N/2)]` of the even (A) to the odd (B) tokens of `metric` `[B, N, C]`."""
    # A zero vector would give 0 / 0 = NaN and poison the argsort; clamping its norm makes it dissimilar to all.
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)
    return metric[..., ::2, :] @ metric[..., 1::2, :].transpose(-1, -2)


def _bipartite_merge(scores: torch.Tensor, r: int, class_token: bool, num_tokens: int) -> tuple[Callable, Callable]:
    """Merge / unmerge functions that move the `r` A tokens with the highest row maximum of `scores` into their
    best B token (shared by ToMe and Turbo, which differ only in the scores)."""
    with torch.no_grad():
        if class_token:
            # The class token is A's first element: it must never be a source, so it sorts last below.
            scores[..., 0, :] = -math.inf

        node_max, node_idx = scores.max(dim=-1)
        # Stable sort so that ties (e.g. duplicated tokens) are broken by position, identically on every device.
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]

        unm_idx = edge_idx[..., r:, :]  # A tokens that are kept, shape (batch_size, num_a - r, 1)
        src_idx = edge_idx[..., :r, :]  # A tokens that are merged away, shape (batch_size, r, 1)
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)  # their B partners, shape (batch_size, r, 1)

        if class_token:
            # The class token has score -inf and sits at the end of `unm_idx`; sorting puts it (and the rest) back in
            # spatial order so downstream code can keep reading the class token at index 0.
            unm_idx = unm_idx.sort(dim=-2).values

    num_unm = unm_idx.shape[-2]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, _, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, num_unm, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        # `include_self` (default) keeps the destination's own value in the reduction, e.g. in the mean.
        dst = dst.scatter_reduce(dim=-2, index=dst_idx.expand(n, r, c), src=src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm, dst = x[..., :num_unm, :], x[..., num_unm:, :]
        n, _, c = unm.shape
        src = dst.gather(dim=-2, index=dst_idx.expand(n, r, c))

        out = torch.zeros(n, num_tokens, c, device=x.device, dtype=x.dtype)
        out[..., 1::2, :] = dst
        # A token at A-index i sits at original position 2 * i.
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, num_unm, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(n, r, c), src=src)
        return out

    return merge, unmerge


# ----------------------------------------------------------------------------------------------------------------
# the reducer


def reduce_tome(layer, x, internals: AttentionInternals, state: ReductionState, r: int) -> torch.Tensor:
    """ToMe: bipartite soft matching on the keys averaged over heads, size-weighted merging."""
    if r <= 0:
        return x
    merge, _ = bipartite_soft_matching(internals.keys.mean(dim=1), r, class_token=state.class_token)
    return merge_tracked(merge, x, state)


def merge_tracked(merge: Callable, x: torch.Tensor, state: ReductionState) -> torch.Tensor:
    """Apply a ToMe-style `merge` to `x` `[B, N, D]` and to the token sizes (and sources, when traced)."""
    if state.trace_source:
        state.source = merge_source(merge, x, state.source)
    x, state.size = merge_wavg(merge, x, state.size)
    return x


def bipartite_scoring_flops(n: int, r: int, shape, options: dict) -> int:
    """FLOPs of `_bipartite_scores` for `n` tokens: `[ceil(n/2), head_dim] @ [head_dim, floor(n/2)]`."""
    return 2 * ((n + 1) // 2) * (n // 2) * shape.head_dim


def merged_sources(state: ReductionState) -> torch.Tensor | None:
    """`[B, N', N0]` bool: the original tokens each token holds (traced when `state.trace_source` was set)."""
    return None if state.source is None else state.source > 0


REDUCER = register_reducer(Reducer("tome", reduce_tome, sources=merged_sources, scoring_flops=bipartite_scoring_flops))
