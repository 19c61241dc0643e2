"""Token reduction kernels that several algorithms share: size-weighted merging, source tracking, gathering, and
the per-layer schedules (`parse_r`, `token_schedule`, `r_for_keep_ratio`, `keep_count`).

Pure functions on tensors, no module state. Each algorithm's own kernels live in its file (`tome.py`, `turbo.py`,
`crossget.py`, `fastv.py`, `visionzip.py`, `prumerge.py`). This file is copied verbatim next to the modeling code of
exported Hugging Face checkpoints, so it imports nothing but `math`, `typing` and `torch`.
"""

import math
from typing import Callable

import torch

__all__ = ["compute_dtype", "do_nothing", "gather_tokens", "keep_count", "merge_source", "merge_wavg", "parse_r", "r_for_keep_ratio",
           "token_schedule"]


def do_nothing(x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """Identity with the signature of a merge / unmerge function; returned when there is nothing to merge."""
    return x


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


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype scores and merges are computed in: `torch.promote_types(dtype, torch.float32)` over the inputs, so
    float32 and float64 follow the papers' code exactly (it computes in the input dtype) while half precision is
    computed in float32 (an addition to the papers: a bf16 softmax over hundreds of tokens ranks ties at random)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[b, index[b]]` for every batch row: `x` of shape `(batch_size, num_tokens, *rest)`, `index` of shape
    `(batch_size, k)` → `(batch_size, k, *rest)`."""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expanded)


# ----------------------------------------------------------------------------------------------------------------
# schedules


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


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """Tokens kept out of `num_tokens` at `keep_ratio` in `(0, 1]`: rounded half up, at least 1 (0 of 0)."""
    if num_tokens <= 0:
        return 0
    return max(1, min(num_tokens, int(math.floor(keep_ratio * num_tokens + 0.5))))
