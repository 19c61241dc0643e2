"""Token reduction kernels: ToMe (Bolya et al., ICLR 2023), Turbo (Ju et al., ECCV 2024), CrossGET (Shi et al.,
ICML 2024) and the schedules they share.

Pure functions on tensors, no module state. This file is copied verbatim next to the modeling code of exported
Hugging Face checkpoints, so it imports nothing but `math`, `typing` and `torch`.

Typical use inside a transformer block, between attention and MLP:

```python
merge, _ = bipartite_soft_matching(keys.mean(1), r, class_token=True)
hidden_states, size = merge_wavg(merge, hidden_states, size)
```
"""

import math
from typing import Callable

import torch

__all__ = [
    "bipartite_soft_matching",
    "complete_graph_soft_matching",
    "cross_attention_keep_counts",
    "informativity_soft_matching",
    "r_for_keep_ratio",
    "turbo_semantic_weight",
    "do_nothing",
    "fastv_keep_index",
    "gather_tokens",
    "iqr_outlier_count",
    "keep_count",
    "last_token_attention",
    "merge_source",
    "merge_wavg",
    "parse_r",
    "prumerge_keep_index",
    "prumerge_merge",
    "received_cross_attention",
    "token_schedule",
    "top_received_index",
    "visionzip_merge",
]


def do_nothing(x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """Identity with the signature of a merge / unmerge function; returned when there is nothing to merge."""
    return x


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


def informativity_soft_matching(
    metric: torch.Tensor,
    cls_attention: torch.Tensor,
    r: int,
    semantic_weight: float,
    class_token: bool = True,
) -> tuple[Callable, Callable]:
    """
    Turbo's informativity-driven matching: ToMe's bipartite matching with the A tokens ranked by mutual redundancy
    minus semantic value, so that tokens the class token attends to are merged last.

    The score of A token `i` with B token `j` is `cos(metric_i, metric_j) - semantic_weight * cls_attention_i`. The
    second term is constant along a row, so it changes only *which* A tokens merge, not where they go.

    Args:
        metric (`torch.Tensor` of shape `(batch_size, num_tokens, channels)`): keys averaged over heads.
        cls_attention (`torch.Tensor` of shape `(batch_size, num_tokens)`): attention of the class token (query 0) to
            every token, averaged over heads (rows sum to 1).
        r (`int`): tokens to remove, clamped as in [`bipartite_soft_matching`].
        semantic_weight (`float`): the weight of the semantic value, see [`turbo_semantic_weight`].
        class_token (`bool`): whether index 0 is a class token, which is never merged.

    Returns:
        `(merge, unmerge)` with the semantics of [`bipartite_soft_matching`].
    """
    num_tokens = metric.shape[-2]
    r = min(r, (num_tokens - int(class_token)) // 2)
    if r <= 0:
        return do_nothing, do_nothing
    with torch.no_grad():
        scores = _bipartite_scores(metric) - semantic_weight * cls_attention[..., ::2, None].to(metric.dtype)
    return _bipartite_merge(scores, r, class_token, num_tokens)


def turbo_semantic_weight(alpha: float, beta: float, gamma: float, merging_layer: int) -> float:
    """Turbo's weight of the semantic value at the `merging_layer`-th merging layer (0-based):
    `30 * alpha * beta ** |gamma - merging_layer|` (the factor 30 brings attention proportions, about 1 / num_tokens
    each, to the scale of cosine similarities; with `beta = 1` the weight is the same at every layer)."""
    return 30.0 * alpha * beta ** abs(gamma - merging_layer)


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

        weights = torch.stack([importance.gather(1, src), importance.gather(1, dst)], dim=-1).float().softmax(-1)
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


def r_for_keep_ratio(num_tokens: int, num_layers: int, keep_ratio: float, num_protected: int = 1,
                     min_tokens: int = 0) -> int:
    """
    The constant per-layer `r` whose schedule (with clamping, see [`token_schedule`]) leaves the token count after
    the last layer closest to `keep_ratio * num_tokens` (ties go to the smaller `r`).
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}.")
    target = keep_ratio * num_tokens
    best_r, best_gap = 0, math.inf
    for r in range(num_tokens + 1):
        last = token_schedule(num_tokens, [r] * num_layers, num_protected, min_tokens)[1][-1] if num_layers else \
            num_tokens
        gap = abs(last - target)
        if gap < best_gap:
            best_r, best_gap = r, gap
    return best_r


def merge_wavg(
    merge: Callable, x: torch.Tensor, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Merges tokens by their size-weighted average, so a token that already holds many patches outweighs a single one.

    Args:
        merge (`Callable`):
            A merge function returned by [`bipartite_soft_matching`].
        x (`torch.Tensor` of shape `(batch_size, num_tokens, dim)`):
            Tokens to merge.
        size (`torch.Tensor` of shape `(batch_size, num_tokens, 1)`, *optional*):
            Number of original patches each token holds; all ones when `None`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: merged tokens of shape `(batch_size, num_tokens - r, dim)` and their sizes
        of shape `(batch_size, num_tokens - r, 1)` (the sum of the merged sizes).
    """
    if size is None:
        size = torch.ones_like(x[..., 0, None])

    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: Callable, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """
    Tracks which original patches each token holds (for visualisation and for unmerging to the input resolution).

    Args:
        merge (`Callable`):
            A merge function returned by [`bipartite_soft_matching`].
        x (`torch.Tensor` of shape `(batch_size, num_tokens, dim)`):
            The tokens being merged; only its shape, device and dtype are read (to build the initial map).
        source (`torch.Tensor` of shape `(batch_size, num_tokens, num_original_tokens)`, *optional*):
            One-hot map from current to original tokens: `source[b, i, j] = 1` when token `i` holds original token `j`.
            The identity of size `num_tokens` when `None`.

    Returns:
        `torch.Tensor` of shape `(batch_size, num_tokens - r, num_original_tokens)`: the map after merging; each row
        sums to the token's size.
    """
    if source is None:
        batch_size, num_tokens, _ = x.shape
        source = torch.eye(num_tokens, device=x.device, dtype=x.dtype)[None].expand(batch_size, num_tokens, num_tokens)

    return merge(source, mode="amax")


def parse_r(num_layers: int, r: int | tuple[int, float] | list[int]) -> list[int]:
    """
    Expands a ToMe `r` setting into the number of tokens to remove at each layer.

    Args:
        num_layers (`int`):
            Number of transformer layers.
        r (`int`, `tuple[int, float]` or `list[int]`):
            - `int`: the same `r` at every layer.
            - `(r, inflect)` (a tuple, or a 2-element list whose second element is a float): a linear ramp with the
              same total as a constant `r` (up to rounding down). `inflect < 0` removes more tokens early (decreasing
              schedule), `inflect > 0` more tokens late, `inflect = 0` is constant.
            - `list[int]`: one value per layer; shorter lists are padded with 0 (no merging in the last layers).

    Returns:
        `list[int]` of length `num_layers`.

    Raises:
        `ValueError`: a negative `num_layers` or `r`, a ramp that goes below 0, or a list longer than `num_layers`.
        `TypeError`: `r` of another type.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers must be an integer >= 0, got {num_layers!r}.")

    def check_int(value, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__}).")
        if value < 0:
            raise ValueError(f"{what} must be >= 0 (tokens removed per layer), got {value}.")
        return value

    is_ramp = isinstance(r, (tuple, list)) and len(r) == 2 and (isinstance(r, tuple) or isinstance(r[1], float))
    if is_ramp:
        base = check_int(r[0], "r in (r, inflect)")
        if isinstance(r[1], bool) or not isinstance(r[1], (int, float)) or not math.isfinite(r[1]):
            raise TypeError(f"inflect in (r, inflect) must be a finite number, got {r[1]!r}.")
        inflect = float(r[1])
        if num_layers <= 1:
            return [base] * num_layers
        # Linear ramp from `first` to `last` around the mean `base`; int() truncates, as in the reference ToMe code,
        # so the schedule's total can fall short of `num_layers * base` by up to `num_layers`.
        first = int(base * (1.0 - inflect))
        last = 2 * base - first
        step = (last - first) / (num_layers - 1)
        schedule = [int(first + step * i) for i in range(num_layers)]
        if min(schedule, default=0) < 0:
            raise ValueError(
                f"r={tuple(r)!r} gives a schedule from {first} to {last} tokens per layer, which goes below 0; "
                "use an inflect between -1 and 1."
            )
        return schedule

    if isinstance(r, (tuple, list)):
        values = [check_int(value, f"r[{i}]") for i, value in enumerate(r)]
        if len(values) > num_layers:
            raise ValueError(
                f"r lists {len(values)} values but the model has {num_layers} layers; give at most one per layer."
            )
        return values + [0] * (num_layers - len(values))

    return [check_int(r, "r")] * num_layers


def token_schedule(num_tokens: int, r_per_layer: list[int], num_protected: int = 1,
                   min_tokens: int = 0) -> tuple[list[int], list[int]]:
    """
    Simulates the per-layer clamping of [`bipartite_soft_matching`] to predict token counts without running a model.

    Args:
        num_tokens (`int`):
            Number of tokens entering the first layer (e.g. 197 for ViT-B/16 at 224 px with a class token).
        r_per_layer (`list[int]`):
            Requested tokens to remove at each layer, e.g. from [`parse_r`].
        num_protected (`int`, *optional*, defaults to 1):
            Tokens that never merge (1 for a class token, 2 with a distillation token, 0 for none).
        min_tokens (`int`, *optional*, defaults to 0):
            A layer entered by fewer tokens than this merges nothing (Turbo's `r_threshold`).

    Returns:
        `tuple[list[int], list[int]]`: the effective `r` at each layer (`min(r, (n - num_protected) // 2)`, at least 0)
        and the number of tokens after each layer.
    """
    if num_tokens < 0 or num_protected < 0:
        raise ValueError(f"num_tokens and num_protected must be >= 0, got {num_tokens} and {num_protected}.")

    effective, remaining = [], []
    n = num_tokens
    for requested in r_per_layer:
        r = max(0, min(requested, (n - num_protected) // 2)) if n >= min_tokens else 0
        n -= r
        effective.append(r)
        remaining.append(n)
    return effective, remaining


# ----------------------------------------------------------------------------------------------------------------
# Visual-token pruning for LLaVA-style models: FastV (inside the language model), VisionZip and PruMerge (at the
# vision encoder's output). All keep the survivors in their original order.


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[b, index[b]]` for every batch row: `x` of shape `(batch_size, num_tokens, *rest)`, `index` of shape
    `(batch_size, k)` → `(batch_size, k, *rest)`."""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expanded)


def last_token_attention(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """
    Attention probabilities of one query per sample over all keys, averaged over heads (FastV's image-token score).

    Args:
        query (`torch.Tensor` of shape `(batch_size, num_heads, head_dim)`):
            The query of the last prompt token, after rotary embedding.
        keys (`torch.Tensor` of shape `(batch_size, num_kv_heads, seq_len, head_dim)`):
            The keys of the same layer, after rotary embedding. Under grouped-query attention `num_heads` is a
            multiple of `num_kv_heads`, and key head `j` serves query heads `j * groups ... (j + 1) * groups - 1`.
        valid (`torch.Tensor` of shape `(batch_size, seq_len)`, bool):
            Keys the query attends to (False for padding and for tokens after the query).
        scale (`float`):
            Factor on the dot products (`head_dim ** -0.5` in Llama).

    Returns:
        `torch.Tensor` of shape `(batch_size, seq_len)`, float32: the softmax row of every head, averaged over heads;
        0 on invalid keys.
    """
    b, h, d = query.shape
    groups = h // keys.shape[1]
    # [B, Hkv, groups, d] x [B, Hkv, L, d] -> [B, Hkv, groups, L], without materialising repeated keys
    logits = torch.einsum("bkgd,bkld->bkgl", query.reshape(b, -1, groups, d).float(), keys.float()) * scale
    logits = logits.masked_fill(~valid[:, None, None, :], -math.inf)
    return logits.softmax(dim=-1).mean(dim=(1, 2))


def fastv_keep_index(scores: torch.Tensor, image_mask: torch.Tensor, num_keep: int) -> torch.Tensor:
    """
    Positions FastV keeps: every non-image token, plus the `num_keep` image tokens of each row with the highest score.

    Args:
        scores (`torch.Tensor` of shape `(batch_size, seq_len)`):
            Attention each token receives from the last prompt token ([`last_token_attention`]).
        image_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, bool):
            Image-token positions. Every row must hold the same number of image tokens, so that every row drops the
            same number and the batch stays rectangular; padding tokens are non-image tokens and are kept.
        num_keep (`int`):
            Image tokens kept per row, clamped to `[0, image tokens per row]`.

    Returns:
        `torch.Tensor` of shape `(batch_size, seq_len - dropped)`, long, ascending in every row: the kept positions in
        their original order, so gathering hidden states, position ids and masks with it keeps the sequence causal
        and every token at its original position. Equal scores go to the earlier position.
    """
    batch_size, seq_len = image_mask.shape
    n_image = image_mask.sum(dim=1)
    if bool((n_image != n_image[0]).any()):
        raise ValueError(f"every row must hold the same number of image tokens for FastV, got {n_image.tolist()}")
    drop = int(n_image[0]) - max(0, min(int(num_keep), int(n_image[0])))
    if drop == 0:
        return torch.arange(seq_len, device=image_mask.device).expand(batch_size, seq_len)
    priority = scores.float().masked_fill(~image_mask, math.inf)  # text and padding always stay
    order = priority.argsort(dim=1, descending=True, stable=True)
    return order[:, : seq_len - drop].sort(dim=1).values


def visionzip_merge(
    hidden_states: torch.Tensor,
    cls_attention: torch.Tensor,
    metric: torch.Tensor,
    dominant: int,
    contextual: int,
    return_source: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """
    VisionZip: keep the class token, the `dominant` patches the class token attends to most, and `contextual` tokens
    that each average a group of the remaining patches grouped by similarity.

    The remaining patches (original order) are split into `contextual` anchors, taken at a uniform stride
    `max(1, remaining // contextual)` from the first, and the others, each of which joins the anchor whose `metric`
    is most similar (cosine; ties to the earlier anchor). A contextual token is the mean of its anchor and the
    patches that joined it.

    Args:
        hidden_states (`torch.Tensor` of shape `(batch_size, num_tokens, dim)`):
            Tokens of the feature layer; index 0 is the class token.
        cls_attention (`torch.Tensor` of shape `(batch_size, num_tokens)`):
            Attention of the class-token query to every token (summed or averaged over heads: same ranking).
        metric (`torch.Tensor` of shape `(batch_size, num_tokens, channels)`):
            Similarity features (the layer's keys averaged over heads).
        dominant (`int`), contextual (`int`):
            Counts, clamped to `0 <= dominant <= num_tokens - 1` and `0 <= contextual <= num_tokens - 1 - dominant`.
        return_source (`bool`, *optional*, defaults to `False`):
            Also return where each output token stands in the input: `(batch_size, 1 + dominant + contextual)`, long
            (0 for the class token, a contextual token at its anchor's index).

    Returns:
        `torch.Tensor` of shape `(batch_size, 1 + dominant + contextual, dim)`: `[class token, dominant patches in
        original order, contextual tokens in the original order of their anchors]`. Equal attention goes to the
        earlier patch.
    """
    batch_size, num_tokens, dim = hidden_states.shape
    patches = num_tokens - 1
    dominant = max(0, min(int(dominant), patches))
    contextual = max(0, min(int(contextual), patches - dominant))
    with torch.no_grad():
        order = cls_attention[:, 1:].float().argsort(dim=1, descending=True, stable=True) + 1
        dom = order[:, :dominant].sort(dim=1).values
        rest = order[:, dominant:].sort(dim=1).values  # [B, R] positions of the other patches, original order
    parts = [hidden_states[:, :1], gather_tokens(hidden_states, dom)]
    source = [torch.zeros_like(dom[:, :1]), dom]
    if contextual > 0:
        remaining = rest.shape[1]
        step = max(1, remaining // contextual)
        # index lists built from shapes only (no boolean-mask indexing), so the graph has static shapes for export
        anchor_idx = list(range(0, step * contextual, step))
        other_idx = [i for i in range(remaining) if i % step or i >= step * contextual]
        anchors = rest[:, torch.tensor(anchor_idx, device=rest.device)]
        others = rest[:, torch.tensor(other_idx, dtype=torch.long, device=rest.device)]
        x_anchor = gather_tokens(hidden_states, anchors).float()
        sums = x_anchor
        counts = torch.ones(batch_size, contextual, 1, device=hidden_states.device)
        if others.shape[1] > 0:
            with torch.no_grad():
                unit = metric.float() / metric.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
                sim = gather_tokens(unit, others) @ gather_tokens(unit, anchors).transpose(1, 2)  # [B, R - c, c]
                assign = sim.argmax(dim=-1, keepdim=True)  # [B, R - c, 1]: first maximum wins ties
            x_other = gather_tokens(hidden_states, others).float()
            sums = sums.scatter_add(1, assign.expand(-1, -1, dim), x_other)
            counts = counts.scatter_add(1, assign, torch.ones_like(assign, dtype=counts.dtype))
        parts.append((sums / counts).to(hidden_states.dtype))
        source.append(anchors)
    out = torch.cat(parts, dim=1)
    return (out, torch.cat(source, dim=1)) if return_source else out


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


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """Tokens kept out of `num_tokens` at `keep_ratio` in `(0, 1]`: rounded half up, at least 1 (0 of 0)."""
    if num_tokens <= 0:
        return 0
    return max(1, min(num_tokens, int(math.floor(keep_ratio * num_tokens + 0.5))))


# ----------------------------------------------------------------------------------------------------------------
# Turbo's cross-attention-guided pruning of the image tokens inside BLIP's text encoder (methods.md §5a)


def cross_attention_keep_counts(num_tokens: int, num_layers: int, step: float = 0.07,
                                min_keep: float = 0.2) -> list[int]:
    """
    Image tokens Turbo keeps after each text-encoder layer: `k_i = max(N0 · min_keep, (1 − step · (i + 1)) · N0)`,
    rounded down, clamped to `[1, N0]`.

    Args:
        num_tokens (`int`): `N0`, the image tokens entering the text encoder (class token included).
        num_layers (`int`): text-encoder layers.
        step (`float`): fraction of `N0` dropped per layer (Turbo: 0.07).
        min_keep (`float`): floor, as a fraction of `N0` (Turbo: 0.2, i.e. `N0 · (1 − 0.8)`).

    Returns:
        `list[int]` of length `num_layers`, non-increasing: `k_i` for layer `i` (the count the next layer sees).
    """
    if num_tokens <= 0:
        return [0] * num_layers
    # the small epsilon keeps exact products such as (1 - 0.07 * 10) * 100 = 30 from flooring to 29
    floor = math.floor(min_keep * num_tokens + 1e-6)
    return [max(1, min(num_tokens, max(floor, math.floor((1.0 - step * (i + 1)) * num_tokens + 1e-6))))
            for i in range(num_layers)]


def received_cross_attention(probs: torch.Tensor, query_valid: torch.Tensor | None = None) -> torch.Tensor:
    """
    Cross-attention each image token receives: the attention probabilities summed over heads and text queries.

    Args:
        probs (`torch.Tensor` of shape `(batch_size, num_heads, num_queries, num_tokens)`):
            Softmax of the text queries over the image tokens.
        query_valid (`torch.Tensor` of shape `(batch_size, num_queries)`, bool, *optional*):
            Text queries that count (False for padding, so that a padded sample scores like the same sample alone).

    Returns:
        `torch.Tensor` of shape `(batch_size, num_tokens)`, float32.
    """
    per_query = probs.float().sum(dim=1)  # [B, Lq, N]
    if query_valid is not None:
        per_query = per_query * query_valid[..., None].to(per_query.dtype)
    return per_query.sum(dim=1)


def top_received_index(received: torch.Tensor, num_keep: int, keep_first: bool = True) -> torch.Tensor:
    """
    The `num_keep` image tokens that received the most cross-attention, in their original order.

    Args:
        received (`torch.Tensor` of shape `(batch_size, num_tokens)`): [`received_cross_attention`].
        num_keep (`int`): tokens kept per sample, clamped to `[1, num_tokens]`.
        keep_first (`bool`): always keep token 0 (the image class token), whatever it received.

    Returns:
        `torch.Tensor` of shape `(batch_size, num_keep)`, long, ascending in every row; equal scores go to the earlier
        token.
    """
    num_keep = max(1, min(int(num_keep), received.shape[1]))
    priority = received.float()
    if keep_first:
        priority = priority.clone()
        priority[:, 0] = math.inf
    order = priority.argsort(dim=1, descending=True, stable=True)
    return order[:, :num_keep].sort(dim=1).values
