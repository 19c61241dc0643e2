"""Contrastive losses over every process's rows: with N processes (torchrun / accelerate), the dual encoders' task
losses compare each row with the whole global batch, as one process at the global batch does (open_clip's
`--gather-with-grad`), instead of with the process's own rows only.

Gradients: every process computes the same global loss; `all_gather`'s backward sums, into each process's own rows,
the gradient every process computed for them (N times the one-process gradient), and data parallelism averages the
parameter gradients over the N processes: the result is the one-process gradient of the global-batch loss.
"""

from __future__ import annotations

import hashlib

import torch


def world_size() -> int:
    """Processes in the default process group (1 when none is initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """`[B, ...]` of every process concatenated in rank order (no gradient)."""
    parts = [torch.empty_like(x) for _ in range(world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; backward: the sum over processes of the gradient of this process's rows (all-reduce,
    then this rank's slice; gloo and NCCL both have it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = torch.distributed.get_rank(), x.shape[0]
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """`[B, ...]` on each of N processes → `[N·B, ...]` in rank order, differentiable (every process must give the
    same B, as the trainer's equal shards do)."""
    return x if world_size() == 1 else _GatherRows.apply(x)


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """`[B]` int64 row keys → `[N·B]`, rank order (no gradient)."""
    return keys if world_size() == 1 else _all_gather(keys)


def _hash64(data: bytes) -> int:
    """A stable signed 64-bit hash (Python's own `hash` differs between processes)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def text_keys(texts: list[str]) -> torch.Tensor:
    """`[B]` int64: one key per caption, equal for equal captions in every process."""
    return torch.tensor([_hash64(t.encode()) for t in texts], dtype=torch.int64)


def id_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`[B]` int64 keys of token-id rows (padding left out), for batches built from tensors rather than texts."""
    if attention_mask is not None:
        rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
    else:
        rows = list(input_ids)
    return torch.tensor([_hash64(r.cpu().numpy().tobytes()) for r in rows], dtype=torch.int64)


def global_same_text(keys: torch.Tensor) -> torch.Tensor:
    """`[N·B, N·B]` bool: rows of the global batch whose captions are equal (not each other's negatives)."""
    everyone = gather_keys(keys)
    return everyone[:, None] == everyone[None, :]
