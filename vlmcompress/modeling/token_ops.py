"""Token merging kernels (ToMe, "Token Merging: Your ViT but Faster", Bolya et al., ICLR 2023).

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
    "do_nothing",
    "merge_source",
    "merge_wavg",
    "parse_r",
    "token_schedule",
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
        # A zero vector would give 0 / 0 = NaN and poison the argsort; clamping its norm makes it dissimilar to all.
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)
        metric_a, metric_b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = metric_a @ metric_b.transpose(-1, -2)

        if class_token:
            # The class token is A's first element: it must never be a source, so it sorts last below.
            scores[..., 0, :] = -math.inf
        if distill_token:
            # The distillation token is B's first element: no A token may pick it as destination.
            scores[..., :, 0] = -math.inf

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


def token_schedule(num_tokens: int, r_per_layer: list[int], num_protected: int = 1) -> tuple[list[int], list[int]]:
    """
    Simulates the per-layer clamping of [`bipartite_soft_matching`] to predict token counts without running a model.

    Args:
        num_tokens (`int`):
            Number of tokens entering the first layer (e.g. 197 for ViT-B/16 at 224 px with a class token).
        r_per_layer (`list[int]`):
            Requested tokens to remove at each layer, e.g. from [`parse_r`].
        num_protected (`int`, *optional*, defaults to 1):
            Tokens that never merge (1 for a class token, 2 with a distillation token, 0 for none).

    Returns:
        `tuple[list[int], list[int]]`: the effective `r` at each layer (`min(r, (n - num_protected) // 2)`, at least 0)
        and the number of tokens after each layer.
    """
    if num_tokens < 0 or num_protected < 0:
        raise ValueError(f"num_tokens and num_protected must be >= 0, got {num_tokens} and {num_protected}.")

    effective, remaining = [], []
    n = num_tokens
    for requested in r_per_layer:
        r = max(0, min(requested, (n - num_protected) // 2))
        n -= r
        effective.append(r)
        remaining.append(n)
    return effective, remaining
