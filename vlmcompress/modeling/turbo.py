"""Turbo (Ju et al., ECCV 2024), `algorithm: turbo`: ToMe's matching with the tokens ranked by redundancy minus
`alpha`-weighted class-token attention (informativity), weighted over layers by `beta` / `gamma` (methods.md §5a);
and, on BLIP, cross-attention-guided pruning of the image tokens inside the text encoder.

The text-encoder pruning, rebuilt from the checkpoint:

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
from typing import Any, Callable

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from .patching import swap_forward
from .reduction import AttentionInternals, Reducer, ReductionState, register_reducer
from .spec import TowerSpec
from .token_ops import do_nothing, gather_tokens
from .tome import _bipartite_merge, _bipartite_scores, bipartite_scoring_flops, merge_tracked, merged_sources

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


def patch_cross_attention_pruning(model: nn.Module, tower, options: dict) -> CrossPruningState:
    """Make the text encoder at `tower.hook_path` (its layers at `tower.layers_path`) prune the image tokens
    between layers; `options` holds `text_step` and `text_min_keep`."""
    tower = TowerSpec.read(tower)
    state = CrossPruningState(step=float(options["text_step"]), min_keep=float(options["text_min_keep"]))
    encoder = model.get_submodule(tower.hook_path)
    for handle in getattr(encoder, "_vlmc_cross_hooks", []):
        handle.remove()
    hooks = []
    for layer in model.get_submodule(tower.layers_path):
        hooks.append(layer.crossattention.self.register_forward_hook(_received_hook(state), with_kwargs=True))
    swap_forward(encoder, pruning_encoder_forward, "CrossPruning")
    encoder._vlmc_cross_state = state
    encoder._vlmc_cross_hooks = hooks
    return state


# ----------------------------------------------------------------------------------------------------------------
# kernels


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


# ----------------------------------------------------------------------------------------------------------------
# the reducer


def reduce_turbo(layer, x, internals: AttentionInternals, state: ReductionState, r: int) -> torch.Tensor:
    """Turbo: ToMe's matching with A tokens ranked by redundancy minus weighted CLS attention (methods.md §5a).
    Layers entered by fewer than `r_threshold` tokens merge nothing (they still count as merging layers)."""
    if r <= 0:
        return x
    o = state.options
    weight = turbo_semantic_weight(o["alpha"], o["beta"], o["gamma"], state.merging_layers)
    state.merging_layers += 1
    if x.shape[1] < o["r_threshold"]:
        return x
    merge, _ = informativity_soft_matching(internals.keys.mean(dim=1), internals.cls_attention, r, weight,
                                           class_token=state.class_token)
    return merge_tracked(merge, x, state)


REDUCER = register_reducer(Reducer("turbo", reduce_turbo, cls_attention=True, sources=merged_sources,
                                   scoring_flops=bipartite_scoring_flops,
                                   tower_kinds={KIND: patch_cross_attention_pruning},
                                   counted={KIND: ("image", "image tokens read by cross-attention")}))
