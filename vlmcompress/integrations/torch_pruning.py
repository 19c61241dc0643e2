"""Physical removal of heads and neurons through torch-pruning's layer pruning functions.

Which channels belong together (a head's rows in q/k/v and columns in the output projection, a fused `qkv`'s three
chunks, grouped-query attention groups) is decided by the adapter's units and the `structured_prune` stage; this
module only cuts the tensors, so the coupling rules of vision-language towers stay explicit and testable.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from . import optional_import


def _tp():
    return optional_import("torch_pruning", "torch-pruning", "prune")


def head_channels(heads: Sequence[int], head_dim: int, chunks: int = 1, heads_per_chunk: int = 0) -> list[int]:
    """Channel indices of `heads` (each `head_dim` wide), repeated for each of `chunks` fused chunks."""
    return [c * heads_per_chunk * head_dim + h * head_dim + i
            for c in range(chunks) for h in heads for i in range(head_dim)]


def prune_out_channels(layer: nn.Linear, idxs: Sequence[int]) -> None:
    if idxs:
        _tp().prune_linear_out_channels(layer, sorted(idxs))


def prune_in_channels(layer: nn.Linear, idxs: Sequence[int]) -> None:
    if idxs:
        _tp().prune_linear_in_channels(layer, sorted(idxs))


def version() -> str:
    from importlib.metadata import version as v

    return v("torch-pruning")
