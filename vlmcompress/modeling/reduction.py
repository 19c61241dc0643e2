"""Token reduction inside encoder layers, rebuilt from the checkpoint's `token_reduction` block.

The reducing layer replaces the forward of a pre-norm ViT block (`layer_norm1`, `self_attn`, `layer_norm2`, `mlp`:
the CLIP, SigLIP, BLIP and BLIP-2 layout) by class swap. It computes attention itself so that it can (1) read the
keys for the matching metric without a second projection, (2) add proportional attention (`log(size)` as a key bias,
compatible with SDPA), and (3) work on towers whose heads were pruned (BLIP's stock attention infers the head width
from the residual width, which pruning no longer matches). Per-call state (token sizes, tokens per layer) lives in one
`ReductionState` per tower, reset by a pre-hook on the tower's encoder at every forward.

Modifications to the stock layer: attention via `F.scaled_dot_product_attention`; after the attention residual,
`r` tokens are merged by `bipartite_soft_matching` on the keys averaged over heads, with size-weighted averaging.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .token_ops import bipartite_soft_matching, merge_source, merge_wavg


@dataclass
class ReductionState:
    """Per-forward state of one tower, shared by all its reducing layers."""

    class_token: bool
    proportional_attention: bool
    trace_source: bool = False
    size: torch.Tensor | None = None  # [B, N, 1] original patches per token
    source: torch.Tensor | None = None  # [B, N, N0] which original tokens each token holds (visualisation)
    tokens: list[int] = field(default_factory=list)  # tokens after each layer in the last forward

    def reset(self) -> None:
        self.size, self.source, self.tokens = None, None, []


def attention_with_metric(
    attn: nn.Module, hidden_states: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of a CLIP-style (`q_proj/k_proj/v_proj/out_proj`) or BLIP-style (`qkv/projection`) module.

    Args:
        hidden_states: `[B, N, D]` normalised input.
        bias: additive attention bias broadcastable to `[B, heads, N, N]`, or None.
    Returns:
        `([B, N, D]` attention output, `[B, N, head_dim]` keys averaged over heads).
    """
    b, n, _ = hidden_states.shape
    d = attn.head_dim
    if hasattr(attn, "qkv"):
        q, k, v = attn.qkv(hidden_states).view(b, n, 3, -1, d).permute(2, 0, 3, 1, 4)
        out_proj = attn.projection
    else:
        q = attn.q_proj(hidden_states).view(b, n, -1, d).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(b, n, -1, d).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(b, n, -1, d).transpose(1, 2)
        out_proj = attn.out_proj
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return out_proj(out.transpose(1, 2).reshape(b, n, -1)), k.mean(dim=1)


def reducing_layer_forward(self, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs) -> torch.Tensor:
    """Forward of a reducing encoder layer: `[B, N, D]` → `[B, N - r, D]`."""
    state: ReductionState = self._vlmc_state
    bias = attention_mask
    if state.proportional_attention and state.size is not None:
        # proportional attention: a token that stands for s patches gets s times the attention mass
        size_bias = state.size.log()[:, None, None, :, 0]
        bias = size_bias if bias is None else bias + size_bias
    residual = hidden_states
    attn_out, metric = attention_with_metric(self.self_attn, self.layer_norm1(hidden_states), bias)
    hidden_states = residual + attn_out
    if self._vlmc_r > 0:
        merge, _ = bipartite_soft_matching(metric, self._vlmc_r, class_token=state.class_token)
        if state.trace_source:
            state.source = merge_source(merge, hidden_states, state.source)
        hidden_states, state.size = merge_wavg(merge, hidden_states, state.size)
    hidden_states = hidden_states + self.mlp(self.layer_norm2(hidden_states))
    state.tokens.append(hidden_states.shape[1])
    return hidden_states


_REDUCING_CLASSES: dict[type, type] = {}


def _reducing_class(cls: type) -> type:
    if getattr(cls, "_vlmc_reducing", False):
        return cls
    if cls not in _REDUCING_CLASSES:
        _REDUCING_CLASSES[cls] = type(f"TokenReducing{cls.__name__}", (cls,),
                                      {"forward": reducing_layer_forward, "_vlmc_reducing": True})
    return _REDUCING_CLASSES[cls]


def _reset_hook(state: ReductionState):
    def hook(module, args, kwargs):
        state.reset()

    return hook


def patch_tower(model: nn.Module, tower: dict) -> ReductionState:
    """Turn the encoder layers at `tower["layers_path"]` into reducing layers with per-layer `tower["r"]`."""
    layers = model.get_submodule(tower["layers_path"])
    encoder = model.get_submodule(tower["layers_path"].rpartition(".")[0])
    state = ReductionState(class_token=tower["class_token"], proportional_attention=tower["proportional_attention"])
    for layer, r in zip(layers, tower["r"]):
        layer.__class__ = _reducing_class(type(layer))
        layer._vlmc_state = state
        layer._vlmc_r = int(r)
    if getattr(encoder, "_vlmc_hook", None) is not None:
        encoder._vlmc_hook.remove()
    encoder._vlmc_state = state
    encoder._vlmc_hook = encoder.register_forward_pre_hook(_reset_hook(state), with_kwargs=True)
    return state


def apply_token_reduction(model: nn.Module, spec: dict | None) -> dict[str, ReductionState]:
    """Patch every tower named in a checkpoint's `token_reduction` block; returns the state per component."""
    if not spec:
        return {}
    if spec["algorithm"] != "tome":
        raise ValueError(f"token_reduction.algorithm {spec['algorithm']!r} is not supported by this modeling code")
    return {tower["component"]: patch_tower(model, tower) for tower in spec["towers"]}


def shrink_placeholder_runs(
    input_ids: torch.Tensor, token_id: int, full: int, keep: int, *aligned: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """Shorten every run of `full` placeholder tokens to its first `keep` tokens.

    A processor writes one placeholder per image patch; after token reduction the vision tower hands fewer tokens to
    the language model, so the prompt must hold fewer placeholders. Every row must lose the same number of tokens.

    Args:
        input_ids: `[B, L]`. aligned: tensors `[B, L, ...]` (attention mask, labels, position ids) shortened alike.
    Returns:
        `input_ids` `[B, L']` followed by the shortened `aligned` tensors (None stays None).
    """
    is_placeholder = input_ids == token_id
    # index of each placeholder inside its run: placeholders seen so far minus those seen before the run began
    seen = is_placeholder.long().cumsum(dim=1)
    before_run = torch.cummax(torch.where(is_placeholder, torch.zeros_like(seen), seen), dim=1).values
    index_in_run = seen - before_run - 1
    keep_mask = ~is_placeholder | ((index_in_run % full) < keep)
    kept = keep_mask.sum(dim=1)
    if not bool((kept == kept[0]).all()):
        raise ValueError("every row of the batch must hold the same number of images for token reduction")
    new_len = int(kept[0])
    out = [input_ids[keep_mask].view(input_ids.shape[0], new_len)]
    for t in aligned:
        out.append(None if t is None else t[keep_mask].view(t.shape[0], new_len, *t.shape[2:]))
    return tuple(out)
