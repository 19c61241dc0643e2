"""Patch dropout while training (Liu et al. 2022, "PatchDropout"; Li et al. 2023, FLIP): each training image keeps
a random subset of its patch tokens, so the vision tower's layers run on fewer tokens per sample and a step costs
less. Evaluation and the saved model see every patch; only forward passes in train mode with gradients on drop.

The tokens are dropped where they enter the first vision layer (after the patch and position embeddings and any
pre-norm), so every kept token carries its own position. A leading class token is always kept.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


def kept_count(num_patches: int, rate: float) -> int:
    """Patches kept of `num_patches` when a fraction `rate` is dropped: at least one, rounded to nearest."""
    return max(1, min(num_patches, int(math.floor(num_patches * (1.0 - rate) + 0.5))))


def keep_random_patches(hidden: torch.Tensor, keep: int, class_token: bool,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random subset of `keep` patch tokens per row, in their original order.

    Args:
        hidden: `[B, T, D]` tokens entering the first layer; `T = 1 + N` with a class token first, else `T = N`.
        keep: patch tokens to keep per row (1 … N).
        class_token: index 0 is a class token, kept in every row.
        generator: the random source (None: torch's global generator, which the trainer saves for resume).
    Returns:
        `[B, keep (+1), D]`: the class token (if any), then the kept patches in ascending position.
    """
    first = 1 if class_token else 0
    batch, tokens = hidden.shape[0], hidden.shape[1] - first
    if not 1 <= keep <= tokens:
        raise ValueError(f"keep {keep} must be in 1 … {tokens} (the patch tokens of a row)")
    noise = torch.rand(batch, tokens, generator=generator, device=hidden.device)
    chosen = noise.topk(keep, dim=1).indices.sort(dim=1).values + first  # [B, keep]
    patches = hidden.gather(1, chosen[..., None].expand(-1, -1, hidden.shape[-1]))
    return torch.cat([hidden[:, :1], patches], dim=1) if class_token else patches


@contextlib.contextmanager
def patch_dropout(model: nn.Module, tower, rate: float):
    """While active, training forwards of `model` drop a fraction `rate` of the patch tokens entering the first
    layer of `tower` (the adapter's `VisionTower`: `layers_path`, `num_tokens`, `class_token`). Nothing happens
    at rate 0, in eval mode or under `torch.no_grad()` (a frozen teacher's forward, evaluation)."""
    if rate <= 0:
        yield
        return
    layers = model.get_submodule(tower.layers_path)
    patches = tower.num_tokens - (1 if tower.class_token else 0)
    keep = kept_count(patches, rate)

    def drop(module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = keep_random_patches(hidden, keep, tower.class_token)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, kwargs | {"hidden_states": hidden}

    handle = layers[0].register_forward_pre_hook(drop, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
