"""Token reduction inside encoder layers, rebuilt from the checkpoint's `token_reduction` block.

One patching mechanism serves every per-layer algorithm: the layers of a pre-norm encoder (`layer_norm1`,
`self_attn`, `layer_norm2`, `mlp`: the CLIP, SigLIP, BLIP and BLIP-2 layout) get a reducing forward by class swap.
That forward computes attention itself so that it can (1) hand the algorithm the attention internals it asks for
(keys and queries of every head, the class token's attention row) without a second projection and without forcing
eager attention, (2) add proportional attention (`log(size)` as a key bias, compatible with SDPA), and (3) work on
towers whose heads were pruned. The algorithm is a `Reducer` looked up by name in `REDUCERS`; it runs after the
attention residual and before the MLP (methods.md §1).

Per-call state (token sizes, tokens per layer, CrossGET's cross token, the text tower's padding and end-of-text
positions) lives in one `ReductionState` per tower, reset by a pre-hook at the start of every forward of the tower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cross_pruning import KIND as CROSS_PRUNING, patch_cross_attention_pruning
from .patching import swap_forward
from .token_ops import (bipartite_soft_matching, complete_graph_soft_matching, informativity_soft_matching,
                        merge_source, merge_wavg, turbo_semantic_weight)


@dataclass
class ReductionState:
    """Per-forward state of one tower, shared by all its reducing layers.

    `options` holds the algorithm's knobs from the checkpoint (e.g. Turbo's alpha); `text` describes a text tower
    (`{"causal": bool, "eot": "eos" | "argmax" | "last", "eos_token_id": int}`), None for a vision tower.
    """

    algorithm: str
    class_token: bool
    proportional_attention: bool
    options: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] | None = None
    trace_source: bool = False
    size: torch.Tensor | None = None  # [B, N, 1] original tokens per token
    source: torch.Tensor | None = None  # [B, N, N0] which original tokens each token holds (visualisation)
    tokens: list[int] = field(default_factory=list)  # tokens after each layer in the last forward
    merging_layers: int = 0  # layers that had r > 0 so far in this forward (Turbo's layer counter)
    cross: torch.Tensor | None = None  # [B, 1, D] CrossGET's cross token after the previous layer
    valid: torch.Tensor | None = None  # [B, N] bool: not padding (text towers)
    eot: torch.Tensor | None = None  # [B, N] bool: the end-of-text token (text towers)
    old_to_new: torch.Tensor | None = None  # [B, N0] current index of every input token (order-preserving towers)
    # [B, N'] input-token index each token stands at after a single-point reduction (VisionZip / PruMerge), for
    # LLaVA to give the kept image tokens their original position ids
    source_index: torch.Tensor | None = None

    def reset(self) -> None:
        self.size, self.source, self.tokens, self.merging_layers = None, None, [], 0
        self.cross, self.valid, self.eot, self.old_to_new = None, None, None, None
        self.source_index = None


@dataclass
class AttentionInternals:
    """What a reducer may read from the layer's attention: `queries` / `keys` `[B, heads, N, head_dim]`, and the
    class token's attention row averaged over heads `[B, N]` (only when the reducer asks for it)."""

    queries: torch.Tensor
    keys: torch.Tensor
    cls_attention: torch.Tensor | None = None


@dataclass(frozen=True)
class Reducer:
    """A per-layer token reduction algorithm.

    `reduce(layer, x, internals, state, r) -> x` maps `[B, N, D]` to `[B, N - r', D]` and updates `state.size`
    (and `state.source`, `state.old_to_new` where it tracks them). Flags: `cls_attention` (needs the class token's
    attention row), `cross_token` (a learned token appended to the sequence, CrossGET), `order_preserving`
    (survivors keep their order; needed for text towers), `data_dependent` (the token count depends on the input,
    so the graph cannot be exported with fixed shapes), `after_mlp` (reduce the layer's output instead, after its
    MLP: VisionZip and PruMerge reduce the output of LLaVA's feature layer).
    """

    name: str
    reduce: Callable[..., torch.Tensor]
    cls_attention: bool = False
    cross_token: bool = False
    order_preserving: bool = False
    data_dependent: bool = False
    after_mlp: bool = False


REDUCERS: dict[str, Reducer] = {}


def register_reducer(reducer: Reducer) -> Reducer:
    REDUCERS[reducer.name] = reducer
    return reducer


# ----------------------------------------------------------------------------------------------------------------
# attention with internals


def project_qkv(attn: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values `[B, heads, N, head_dim]` of a CLIP-style (`q_proj/k_proj/v_proj`) or BLIP-style
    (fused `qkv`) attention module."""
    b, n, _ = hidden_states.shape
    d = attn.head_dim
    if hasattr(attn, "qkv"):
        q, k, v = attn.qkv(hidden_states).view(b, n, 3, -1, d).permute(2, 0, 3, 1, 4)
        return q, k, v
    q = attn.q_proj(hidden_states).view(b, n, -1, d).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(b, n, -1, d).transpose(1, 2)
    v = attn.v_proj(hidden_states).view(b, n, -1, d).transpose(1, 2)
    return q, k, v


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                    class_token: bool) -> torch.Tensor:
    """Attention of the class token (query 0) to every token, averaged over heads: `[B, N]`, rows sum to 1.

    A tower without a class token (SigLIP) uses the mean query instead. Costs O(N) per head, so the main attention
    can stay on SDPA.
    """
    query = q[:, :, :1] if class_token else q.mean(dim=2, keepdim=True)  # [B, H, 1, d]
    logits = (query @ k.transpose(-1, -2)) * scale  # [B, H, 1, N]
    if bias is not None:
        logits = logits + (bias[..., :1, :] if class_token or bias.shape[-2] == 1 else bias.mean(dim=-2, keepdim=True))
    return logits.float().softmax(dim=-1).mean(dim=1)[:, 0].to(q.dtype)


def attention_with_internals(attn: nn.Module, hidden_states: torch.Tensor, bias: torch.Tensor | None,
                             want_cls_attention: bool = False,
                             class_token: bool = True) -> tuple[torch.Tensor, AttentionInternals]:
    """Self-attention `[B, N, D]` → (`[B, N, D]` output, internals); `bias` is additive, broadcastable to
    `[B, heads, N, N]`."""
    b, n, _ = hidden_states.shape
    q, k, v = project_qkv(attn, hidden_states)
    out_proj = attn.projection if hasattr(attn, "qkv") else attn.out_proj
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    cls = class_attention(q, k, attn.scale, bias, class_token) if want_cls_attention else None
    return out_proj(out.transpose(1, 2).reshape(b, n, -1)), AttentionInternals(q, k, cls)


def attention_with_metric(attn: nn.Module, hidden_states: torch.Tensor,
                          bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(`[B, N, D]` attention output, `[B, N, head_dim]` keys averaged over heads): ToMe's view of a layer."""
    out, internals = attention_with_internals(attn, hidden_states, bias)
    return out, internals.keys.mean(dim=1)


def attention_bias(state: ReductionState, n: int, incoming: torch.Tensor | None, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor | None:
    """The additive attention bias of a reducing layer for `n` tokens: the text tower's causal / padding mask
    (rebuilt, since tokens moved), plus `log(size)` on the keys for proportional attention."""
    bias = incoming if state.text is None else None
    if state.text is not None and (state.text.get("causal") or state.valid is not None):
        allowed = torch.ones(1, 1, n, n, dtype=torch.bool, device=device)
        if state.text.get("causal"):
            allowed = allowed.tril()
        if state.valid is not None:
            allowed = allowed & state.valid[:, None, None, :]
        # queries that may see nothing (padding before any real key) keep their own key so softmax stays finite
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=device)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    if state.proportional_attention and state.size is not None:
        # proportional attention: a token that stands for s tokens gets s times the attention mass
        size_bias = state.size.log().to(dtype)[:, None, None, :, 0]
        bias = size_bias if bias is None else bias + size_bias
    return bias


# ----------------------------------------------------------------------------------------------------------------
# the reducing layer


def reducing_layer_forward(self, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs) -> torch.Tensor:
    """Forward of a reducing encoder layer: `[B, N, D]` → `[B, N - r, D]` (the full length again after the last
    layer of an order-preserving text tower, so the stock pooling at the end-of-text position keeps working)."""
    state: ReductionState = self._vlmc_state
    reducer = REDUCERS[state.algorithm]
    x = hidden_states
    if reducer.order_preserving and state.old_to_new is None:
        state.old_to_new = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    if reducer.cross_token:
        if state.size is None:
            state.size = torch.ones_like(x[..., :1])
        if state.cross is None:
            state.cross = initial_cross_token(x, state)
        x = torch.cat([x, state.cross.detach() + self.vlmc_cross_token.to(x.dtype)], dim=1)
        state.size = torch.cat([state.size, torch.ones_like(state.size[:, :1])], dim=1)
        if state.valid is not None:
            state.valid = torch.cat([state.valid, state.valid.new_ones(x.shape[0], 1)], dim=1)
    bias = attention_bias(state, x.shape[1], attention_mask, x.dtype, x.device)
    attn_out, internals = attention_with_internals(self.self_attn, self.layer_norm1(x), bias,
                                                   want_cls_attention=reducer.cls_attention and self._vlmc_r > 0,
                                                   class_token=state.class_token)
    x = x + attn_out
    if not reducer.after_mlp:
        x = reducer.reduce(self, x, internals, state, self._vlmc_r)
    x = x + self.mlp(self.layer_norm2(x))
    if reducer.after_mlp:
        x = reducer.reduce(self, x, internals, state, self._vlmc_r)
    if reducer.cross_token:
        state.cross, x = x[:, -1:], x[:, :-1]
        state.size = state.size[:, :-1]
        if state.valid is not None:
            state.valid = state.valid[:, :-1]
    state.tokens.append(x.shape[1])
    if self._vlmc_last and state.text is not None and state.old_to_new is not None:
        x = x.gather(1, state.old_to_new[..., None].expand(-1, -1, x.shape[-1]))
    return x


def initial_cross_token(x: torch.Tensor, state: ReductionState) -> torch.Tensor:
    """CrossGET's cross token before the first layer `[B, 1, D]`: a copy of the class token (vision), of the
    end-of-text token (text), or the mean token (a vision tower without a class token)."""
    if state.text is not None:
        return x[state.eot][:, None]
    return x[:, :1] if state.class_token else x.mean(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------
# the algorithms


def reduce_tome(layer, x, internals: AttentionInternals, state: ReductionState, r: int) -> torch.Tensor:
    """ToMe: bipartite soft matching on the keys averaged over heads, size-weighted merging."""
    if r <= 0:
        return x
    merge, _ = bipartite_soft_matching(internals.keys.mean(dim=1), r, class_token=state.class_token)
    return _merge_tracked(merge, x, state)


def reduce_turbo(layer, x, internals: AttentionInternals, state: ReductionState, r: int) -> torch.Tensor:
    """Turbo: ToMe's matching with A tokens ranked by redundancy minus weighted CLS attention (methods.md §5a).
    Layers entered by fewer than `r_threshold` tokens merge nothing (they still count as merging layers)."""
    if r <= 0:
        return x
    o = state.options
    weight = turbo_semantic_weight(o.get("alpha", 5.0), o.get("beta", 1.0), o.get("gamma", 0.0), state.merging_layers)
    state.merging_layers += 1
    if x.shape[1] < o.get("r_threshold", 0):
        return x
    merge, _ = informativity_soft_matching(internals.keys.mean(dim=1), internals.cls_attention, r, weight,
                                           class_token=state.class_token)
    return _merge_tracked(merge, x, state)


def _merge_tracked(merge: Callable, x: torch.Tensor, state: ReductionState) -> torch.Tensor:
    if state.trace_source:
        state.source = merge_source(merge, x, state.source)
    x, state.size = merge_wavg(merge, x, state.size)
    return x


def reduce_crossget(layer, x, internals: AttentionInternals, state: ReductionState, r: int) -> torch.Tensor:
    """CrossGET: complete-graph matching of the keys (all heads), importance = cosine of each key with the cross
    token's query (the end-of-text token's query on text towers), weighted ensemble, order kept (methods.md §3b).
    `x` ends with the cross token, which is protected like the class / end-of-text tokens."""
    if r <= 0:
        return x
    b, n, _ = x.shape
    keys = internals.keys.transpose(1, 2).reshape(b, n, -1)  # [B, N, D]: full-width keys
    queries = internals.queries.transpose(1, 2).reshape(b, n, -1)
    protected = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    protected[:, -1] = True  # the cross token
    if state.text is not None:
        protected[:, :-1] |= state.eot
        protected[:, 0] = True  # begin-of-text
        guide = queries[:, :-1][state.eot][:, None]  # [B, 1, D] the end-of-text query
    else:
        protected[:, 0] |= state.class_token
        guide = queries[:, -1:]
    importance = (F.normalize(keys.float(), dim=-1) @ F.normalize(guide.float(), dim=-1).transpose(1, 2))[..., 0]
    group = None
    if state.valid is not None:
        group = (~state.valid).long()
        # padding carries nothing: merge it (among itself) before any text token
        importance = importance.masked_fill(~state.valid, -1e4)
    num_protected = 3 if state.text is not None else 1 + int(state.class_token)
    matched = complete_graph_soft_matching(keys, importance, r, protected=protected, group=group,
                                           num_protected=num_protected)
    if matched is None:
        return x
    merge, kept, old_to_new = matched
    x, state.size = merge(x, state.size)
    if state.valid is not None:
        state.valid = state.valid.gather(1, kept)
    if state.eot is not None:
        state.eot = state.eot.gather(1, kept[:, :-1])  # the cross token (last) stays last and is not text
    if state.old_to_new is not None:
        state.old_to_new = old_to_new[:, :-1].gather(1, state.old_to_new)
    return x


register_reducer(Reducer("tome", reduce_tome))
register_reducer(Reducer("turbo", reduce_turbo, cls_attention=True))
register_reducer(Reducer("crossget", reduce_crossget, cross_token=True, order_preserving=True))


# ----------------------------------------------------------------------------------------------------------------
# patching


def _vision_reset_hook(state: ReductionState):
    def hook(module, args, kwargs):
        state.reset()

    return hook


def _text_reset_hook(state: ReductionState):
    """Reset the state and read the padding mask and the end-of-text position from the text tower's inputs."""

    def hook(module, args, kwargs):
        state.reset()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if input_ids is None:
            raise ValueError("token reduction on a text tower needs input_ids (to locate the end-of-text token)")
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        state.valid = None if mask is None else mask.view(input_ids.shape).bool()
        state.eot = end_of_text_mask(input_ids, state.text)

    return hook


def end_of_text_mask(input_ids: torch.Tensor, text: dict[str, Any]) -> torch.Tensor:
    """`[B, L]` bool, True at the token the text tower pools: the first `eos_token_id` (CLIP), the largest id
    (legacy CLIP configs with `eos_token_id == 2`) or the last position (SigLIP)."""
    b, n = input_ids.shape
    if text["eot"] == "last":
        index = torch.full((b,), n - 1, device=input_ids.device)
    elif text["eot"] == "argmax":
        index = input_ids.int().argmax(dim=-1)
    else:
        index = (input_ids == text["eos_token_id"]).int().argmax(dim=-1)
    return F.one_hot(index, n).bool()


def patch_tower(model: nn.Module, tower: dict, algorithm: str = "tome", options: dict | None = None) -> ReductionState:
    """Turn the encoder layers at `tower["layers_path"]` into reducing layers with per-layer `tower["r"]`."""
    if tower.get("kind") == CROSS_PRUNING:  # Turbo's pruning of the image tokens in BLIP's text encoder
        return patch_cross_attention_pruning(model, tower, options)
    if algorithm not in REDUCERS:
        raise ValueError(f"token_reduction.algorithm {algorithm!r} is not supported by this modeling code "
                         f"(supported: {', '.join(REDUCERS)})")
    reducer = REDUCERS[algorithm]
    layers = model.get_submodule(tower["layers_path"])
    text = tower.get("text")
    state = ReductionState(algorithm=algorithm, class_token=tower["class_token"],
                           proportional_attention=tower["proportional_attention"], options=dict(options or {}),
                           text=text)
    for i, (layer, r) in enumerate(zip(layers, tower["r"])):
        swap_forward(layer, reducing_layer_forward, "TokenReducing")
        layer._vlmc_state = state
        layer._vlmc_r = int(r)
        layer._vlmc_last = i == len(layers) - 1
        if reducer.cross_token and "vlmc_cross_token" not in layer._parameters:
            width = layer.layer_norm1.normalized_shape[0]
            weight = layer.layer_norm1.weight
            # CrossGET's per-layer cross token, zero-initialised (learned by a later stage); saved in the state dict
            layer.register_parameter("vlmc_cross_token",
                                     nn.Parameter(torch.zeros(width, dtype=weight.dtype, device=weight.device)))
    hook_path = tower.get("hook_path") or tower["layers_path"].rpartition(".")[0]
    owner = model.get_submodule(hook_path)
    if getattr(owner, "_vlmc_hook", None) is not None:
        owner._vlmc_hook.remove()
    owner._vlmc_state = state
    hook = _text_reset_hook(state) if text is not None else _vision_reset_hook(state)
    owner._vlmc_hook = owner.register_forward_pre_hook(hook, with_kwargs=True)
    return state


def apply_token_reduction(model: nn.Module, spec: dict | None) -> dict[str, ReductionState]:
    """Patch every tower named in a checkpoint's `token_reduction` block; returns the state per component."""
    if not spec:
        return {}
    return {tower["component"]: patch_tower(model, tower, spec["algorithm"], spec.get("options"))
            for tower in spec["towers"]}


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
