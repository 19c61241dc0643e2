"""Turbo's cross-attention-guided pruning of image tokens inside BLIP's text encoder, rebuilt from the checkpoint.

BLIP's image-grounded text encoder (the ITM path) hands the same image tokens (`encoder_hidden_states`) to the
cross-attention of every layer. Turbo (methods.md §5a) shrinks them progressively: after text layer `i`, only the
`k_i` image tokens that received the most cross-attention in that layer (summed over heads and text queries) go on
to the next layer, `k_i = max(N0 · text_min_keep, (1 − text_step · (i + 1)) · N0)`. The image class token (index 0)
is always kept and the survivors keep their order. Nothing reads the image tokens after the last layer, so the last
layer prunes nothing.

The encoder's forward is replaced by class swap (`BlipTextEncoder` → a subclass with its own layer loop). The
attention each image token receives is read by a forward hook on every layer's `crossattention.self`: from the
attention probabilities the stock module returns, or, where a module returns none (an SDPA implementation), from
its query input and the keys recomputed with its own projections. Padding text queries do not vote, so a sample
scores the same alone and in a padded batch. Without image tokens (BLIP's cosine path) or with a cache the stock
forward runs unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from .patching import swap_forward
from .token_ops import cross_attention_keep_counts, gather_tokens, received_cross_attention, top_received_index

KIND = "cross_attention_pruning"


@dataclass
class CrossPruningState:
    """Per-forward state of one pruned text encoder: the knobs, and what the current layer's hook measured."""

    step: float
    min_keep: float
    tokens: list[int] = field(default_factory=list)  # image tokens after each layer in the last forward
    want: bool = False  # the current layer's hook should measure the attention received
    query_valid: torch.Tensor | None = None  # [B, Lq] bool: text queries that are not padding
    received: torch.Tensor | None = None  # [B, N] attention received in the current layer


def query_validity(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`[B, L]` bool from the text encoder's extended mask `[B, 1, L, L]` or `[B, 1, 1, L]` (additive or bool): the
    diagonal says whether each query's own key is visible, i.e. whether the token is not padding."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    m = attention_mask[:, 0]
    row = m.diagonal(dim1=-2, dim2=-1) if m.shape[-2] == m.shape[-1] else m[:, -1]
    if row.dtype == torch.bool:
        return row
    return row > torch.finfo(row.dtype).min / 2


def cross_attention_probs(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                          encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax of a BLIP cross-attention's text queries over the image tokens `[B, H, Lq, N]`, recomputed from its
    query input `[B, Lq, D]` with its own `query` / `key` projections (for modules that return no probabilities)."""
    d = attn.attention_head_size
    b, lq, _ = hidden_states.shape
    q = attn.query(hidden_states).view(b, lq, -1, d).transpose(1, 2)
    k = attn.key(encoder_hidden_states).view(b, encoder_hidden_states.shape[1], -1, d).transpose(1, 2)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d)
    if encoder_attention_mask is not None:
        mask = encoder_attention_mask.to(logits.device)
        logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask.float()
    return logits.softmax(dim=-1)


def _received_hook(state: CrossPruningState):
    def hook(module, args, kwargs, output):
        if not state.want:
            return
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not torch.is_tensor(probs) or probs.dim() != 4:
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = kwargs.get("encoder_attention_mask", kwargs.get("attention_mask"))
            probs = cross_attention_probs(module, hidden, kwargs["encoder_hidden_states"], mask)
        state.received = received_cross_attention(probs, state.query_valid)

    return hook


def pruning_encoder_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            encoder_hidden_states: torch.Tensor | None = None,
                            encoder_attention_mask: torch.Tensor | None = None, past_key_values=None,
                            use_cache: bool | None = None, **kwargs: Any):
    """`BlipTextEncoder.forward` that hands each layer fewer image tokens than the one before (see module doc)."""
    if encoder_hidden_states is None or past_key_values is not None or use_cache:
        return self._vlmc_stock_forward(hidden_states, attention_mask=attention_mask,
                                        encoder_hidden_states=encoder_hidden_states,
                                        encoder_attention_mask=encoder_attention_mask,
                                        past_key_values=past_key_values, use_cache=use_cache, **kwargs)
    state: CrossPruningState = self._vlmc_cross_state
    keep = cross_attention_keep_counts(encoder_hidden_states.shape[1], len(self.layer), state.step, state.min_keep)
    state.tokens, state.query_valid = [], query_validity(attention_mask)
    for i, layer in enumerate(self.layer):
        state.want = i < len(self.layer) - 1 and keep[i] < encoder_hidden_states.shape[1]
        hidden_states = layer(hidden_states, encoder_hidden_states, attention_mask=attention_mask,
                              encoder_attention_mask=encoder_attention_mask, **kwargs)
        if state.want:
            if state.received is None:
                raise RuntimeError(f"{KIND}: layer {i}'s cross-attention was not measured (no crossattention.self?)")
            index = top_received_index(state.received, keep[i], keep_first=True)  # [B, k]
            encoder_hidden_states = gather_tokens(encoder_hidden_states, index)
            if encoder_attention_mask is not None:
                # [B, 1, Lq or 1, N]: the key axis is the last one
                mask_index = index[:, None, None, :].expand(*encoder_attention_mask.shape[:-1], -1)
                encoder_attention_mask = encoder_attention_mask.gather(-1, mask_index)
        state.want, state.received = False, None
        state.tokens.append(encoder_hidden_states.shape[1])
    state.query_valid = None
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, past_key_values=None)


def patch_cross_attention_pruning(model: nn.Module, tower: dict, options: dict | None = None) -> CrossPruningState:
    """Make the text encoder at `tower["hook_path"]` (its layers at `tower["layers_path"]`) prune the image tokens
    between layers; `options` holds `text_step` and `text_min_keep` (Turbo's 0.07 and 0.2 by default)."""
    options = options or {}
    state = CrossPruningState(step=float(options.get("text_step", 0.07)),
                              min_keep=float(options.get("text_min_keep", 0.2)))
    encoder = model.get_submodule(tower["hook_path"])
    for handle in getattr(encoder, "_vlmc_cross_hooks", []):
        handle.remove()
    hooks = []
    for layer in model.get_submodule(tower["layers_path"]):
        hooks.append(layer.crossattention.self.register_forward_hook(_received_hook(state), with_kwargs=True))
    swap_forward(encoder, pruning_encoder_forward, "CrossPruning")
    encoder._vlmc_cross_state = state
    encoder._vlmc_cross_hooks = hooks
    return state
