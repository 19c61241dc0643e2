"""FastV (Chen et al., ECCV 2024), `algorithm: fastv`: drops the least attended image tokens inside the language model
of a LLaVA-style model, rebuilt from the checkpoint's `token_reduction` block.
 The first `K = layer` decoder layers run on the whole prompt. At layer K (index `K - 1`) the attention of the
last prompt token to every image token, averaged over heads, ranks the image tokens; the lowest ones leave the hidden
states and layers `K + 1 ...` (indices `K ...`) run on the shorter sequence. Kept tokens keep their original
positions: their rotary embeddings and position ids are gathered, not recomputed. The pruned layers' KV caches are
shorter than the first K layers' caches, so the cache remembers what was kept and every later forward on it (decode
steps) gathers its attention-mask columns to match; `generate` therefore works as usual.

Modifications to the stock decoder layers (class swap, weights and state-dict keys untouched):
- layer `K - 1` ("probe"): forward hooks on `self_attn.q_proj` / `self_attn.k_proj` keep this layer's queries and
  keys during a fresh prefill that holds image tokens; after the stock forward the one attention row needed is
  computed from them (rotary embedding applied here), so the model keeps its own attention implementation (SDPA,
  eager, flash); the image tokens are ranked and the layer's output is gathered to the kept positions;
- layers `K ...`: the stock forward with the call's attention mask, rotary embeddings and position ids gathered to
  the kept positions.
Image tokens are found as `image_token_id` in the `input_ids` that the LLaVA model receives (a pre-hook on it).
Every row of a batch must hold the same number of image tokens; rows may be left-padded, and each row keeps its own
choice of image tokens. Supported: Llama-style decoder layers (`self_attn.q_proj/k_proj`, `head_dim`, `scaling`,
rotate-half rotary embeddings) with a dynamic (growing) KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .patching import swap_forward
from .reduction import Reducer, register_reducer
from .spec import TowerSpec
from .token_ops import gather_tokens, keep_count

# ----------------------------------------------------------------------------------------------------------------
# kernels


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


# ----------------------------------------------------------------------------------------------------------------
# the decoder layers


@dataclass
class FastVState:
    """State shared by the FastV layers of one model; per-call fields are reset by the pre-hook at every forward."""

    layer: int  # K: layers [0, K) see the whole prompt, layer K - 1 chooses
    keep_ratio: float  # fraction of each row's image tokens kept
    image_token_id: int
    input_ids: torch.Tensor | None = None  # [B, L] of the current call
    padding_mask: torch.Tensor | None = None  # [B, L] 2-D attention mask of the current call, if any
    capture: bool = False
    query: torch.Tensor | None = None  # [B, L, heads * head_dim] q_proj output of the probe layer
    keys: torch.Tensor | None = None  # [B, L, kv_heads * head_dim] k_proj output of the probe layer
    call: dict | None = None  # what layers K... use instead of the model's mask / positions in this call
    # results of the last prefill, kept until the next call (labels alignment, inspection, tests)
    keep: torch.Tensor | None = None  # [B, L'] kept positions
    scores: torch.Tensor | None = None  # [B, L] attention of the last prompt token at layer K, mean over heads
    image_tokens: list[int] | None = None  # image tokens per row after each decoder layer

    def reset(self) -> None:
        self.input_ids = self.padding_mask = self.query = self.keys = self.call = None
        self.capture = False


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding on the first `cos.shape[-1]` channels of `x` (`cos` / `sin` broadcast to `x`)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def reduce_mask(mask: Any, keep: torch.Tensor, prompt_len: int, rows: bool) -> Any:
    """The attention mask of a pruned layer: key columns gathered to `[kept prompt positions, positions after the
    prompt]` and, in the prefill (`rows`), query rows gathered to the kept positions.

    Args:
        mask: None (causal without padding: stays None), a `[B or 1, 1, q, kv]` boolean / additive mask, or a
            `[B, kv]` padding mask (flash attention).
        keep: `[B, L']` kept positions of the `prompt_len`-token prompt.
    """
    if mask is None:
        return None
    if not torch.is_tensor(mask):
        raise NotImplementedError(f"FastV supports tensor attention masks (sdpa, eager, flash attention); got a "
                                  f"{type(mask).__name__}")
    b = keep.shape[0]
    kv = mask.shape[-1]
    after = torch.arange(prompt_len, kv, device=keep.device).expand(b, -1)
    cols = torch.cat([keep, after], dim=1)
    if mask.dim() == 2:
        return mask.expand(b, -1).gather(1, cols)
    mask = mask.expand(b, *mask.shape[1:])
    mask = mask.gather(3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
    if rows:
        mask = mask.gather(2, keep[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    return mask


def _cache_length(cache, layer_idx: int) -> int:
    return 0 if cache is None else int(cache.get_seq_length(layer_idx))


def fastv_probe_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                        use_cache=False, position_embeddings=None, **kwargs):
    """Layer K - 1: the stock forward, then (fresh prefill with image tokens) rank image tokens and drop the lowest."""
    state: FastVState = self._vlmc_fastv
    ids = state.input_ids
    fresh = _cache_length(past_key_values, self.self_attn.layer_idx) == 0
    select = (fresh and ids is not None and ids.shape[1] == hidden_states.shape[1]
              and bool((ids == state.image_token_id).any()))
    state.capture = select
    try:
        out = self._vlmc_stock_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                       past_key_values=past_key_values, use_cache=use_cache,
                                       position_embeddings=position_embeddings, **kwargs)
    finally:
        state.capture = False
    hidden = out[0] if isinstance(out, tuple) else out
    state.call = None
    if select:
        keep = _choose(self, state, ids, position_embeddings)
        state.query = state.keys = None
        cos, sin = position_embeddings
        b, length = ids.shape
        pos = position_ids if position_ids is not None else torch.arange(length, device=ids.device)[None]
        state.call = {"attention_mask": reduce_mask(attention_mask, keep, length, rows=True),
                      "position_embeddings": (gather_tokens(cos.expand(b, *cos.shape[1:]), keep),
                                              gather_tokens(sin.expand(b, *sin.shape[1:]), keep)),
                      "position_ids": pos.expand(b, -1).gather(1, keep)}
        state.keep = keep
        n_image = int((ids[0] == state.image_token_id).sum())
        kept = int((ids.gather(1, keep)[0] == state.image_token_id).sum())
        # after each decoder layer: the probe layer (index K - 1) hands on the kept tokens
        state.image_tokens = [n_image] * (state.layer - 1) + [kept] * (self._vlmc_num_layers - state.layer + 1)
        if past_key_values is not None:
            past_key_values._vlmc_fastv = (keep, length)  # decode steps on this cache gather mask columns
        hidden = gather_tokens(hidden, keep)
    elif past_key_values is not None:
        if fresh:
            past_key_values._vlmc_fastv = None  # a reused, emptied cache forgets an earlier prompt's choice
        pruned = getattr(past_key_values, "_vlmc_fastv", None)
        if pruned is not None:
            keep, length = pruned
            state.call = {"attention_mask": reduce_mask(attention_mask, keep, length, rows=False)}
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def _choose(layer: nn.Module, state: FastVState, ids: torch.Tensor, position_embeddings) -> torch.Tensor:
    """`[B, L']` positions kept: every non-image token and each row's most attended image tokens."""
    attn = layer.self_attn
    b, length = ids.shape
    d = attn.head_dim
    valid = torch.ones(b, length, dtype=torch.bool, device=ids.device)
    if state.padding_mask is not None and state.padding_mask.dim() == 2:
        valid = state.padding_mask.to(torch.bool)
    # the last real token of every row (left padding: position L - 1; right padding: before the pads)
    last = length - 1 - valid.flip(1).to(torch.int8).argmax(dim=1)
    rows = torch.arange(b, device=ids.device)
    cos, sin = (t.expand(b, *t.shape[1:]) for t in position_embeddings)  # [B, L, rot]
    query = state.query.view(b, length, -1, d)[rows, last]  # [B, heads, d]
    query = rotate_half_rope(query, cos[rows, last][:, None], sin[rows, last][:, None])
    keys = state.keys.view(b, length, -1, d).transpose(1, 2)  # [B, kv_heads, L, d]
    keys = rotate_half_rope(keys, cos[:, None], sin[:, None])
    valid = valid & (torch.arange(length, device=ids.device)[None] <= last[:, None])
    scores = last_token_attention(query, keys, valid, attn.scaling)
    state.scores = scores
    image = ids == state.image_token_id
    return fastv_keep_index(scores, image, keep_count(int(image[0].sum()), state.keep_ratio))


def fastv_pruned_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                         use_cache=False, position_embeddings=None, **kwargs):
    """Layers K...: the stock forward with the mask (and, in the prefill, the positions) of the kept tokens."""
    call = self._vlmc_fastv.call
    if call is not None:
        attention_mask = call["attention_mask"]
        if "position_embeddings" in call:
            position_embeddings, position_ids = call["position_embeddings"], call["position_ids"]
    return self._vlmc_stock_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                    past_key_values=past_key_values, use_cache=use_cache,
                                    position_embeddings=position_embeddings, **kwargs)


def _capture_hook(state: FastVState, name: str):
    def hook(module, args, output):
        if state.capture:
            setattr(state, name, output)

    return hook


def apply_fastv(model: nn.Module, tower: dict | TowerSpec) -> FastVState:
    """Patch the decoder layers at `tower.layers_path` for FastV and hook the module at `tower.inputs_path`
    (the LLaVA model that receives `input_ids`) to read the image positions of every call."""
    if isinstance(tower, TowerSpec):  # the checkpoint's tower; tests and callers may give just these keys
        tower = tower.to_dict()
    layers = model.get_submodule(tower["layers_path"])
    k = int(tower["layer"])
    if not 1 <= k < len(layers):
        raise ValueError(f"FastV layer must be in [1, {len(layers) - 1}] for {len(layers)} decoder layers, got {k}")
    state = FastVState(layer=k, keep_ratio=float(tower["keep_ratio"]), image_token_id=int(tower["image_token_id"]))
    for i, layer in enumerate(layers):
        for handle in getattr(layer, "_vlmc_hooks", []):
            handle.remove()
        layer._vlmc_hooks = []
        if i < k - 1:
            continue
        if i == k - 1:
            swap_forward(layer, fastv_probe_forward, "FastVProbe")
        else:
            swap_forward(layer, fastv_pruned_forward, "FastVPruned")
        layer._vlmc_fastv = state
        layer._vlmc_num_layers = len(layers)
        if i == k - 1:
            attn = layer.self_attn
            layer._vlmc_hooks = [attn.q_proj.register_forward_hook(_capture_hook(state, "query")),
                                 attn.k_proj.register_forward_hook(_capture_hook(state, "keys"))]
    inputs = model.get_submodule(tower["inputs_path"])
    for handle in getattr(inputs, "_vlmc_fastv_hooks", []):
        handle.remove()

    def before(module, args, kwargs):
        state.reset()
        state.keep = state.scores = state.image_tokens = None
        state.input_ids = kwargs.get("input_ids", args[0] if args else None)
        state.padding_mask = kwargs.get("attention_mask")

    def after(module, args, kwargs, output):
        state.reset()  # drop the per-call tensors; keep / scores stay for the LLaVA class (labels) and inspection

    inputs._vlmc_fastv = state
    inputs._vlmc_fastv_hooks = [inputs.register_forward_pre_hook(before, with_kwargs=True),
                                inputs.register_forward_hook(after, with_kwargs=True, always_call=True)]
    return state


def patch_fastv(model: nn.Module, tower, options: dict | None = None) -> FastVState:
    """The reducer's patcher: FastV works on the language model's decoder layers, not on encoder layers."""
    return apply_fastv(model, tower)


# the language model is patched as a whole (`patch`); the vision-tower forward of `reduction.py` is not used
def fastv_scoring_flops(n: int, r: int, shape, options: dict) -> int:
    """FLOPs of `last_token_attention` at layer K: one query per head against the `n` keys."""
    return 2 * n * shape.width


def fastv_sources(state: FastVState) -> torch.Tensor | None:
    """`[B, L', L]` bool: the prompt position each token kept after layer K stands at."""
    if state.keep is None:
        return None
    return F.one_hot(state.keep, int(state.keep.max()) + 1).bool()


# the language model is patched as a whole (`patch`); it reduces the output of layer K (`after_mlp`)
REDUCER = register_reducer(Reducer("fastv", patch=patch_fastv, after_mlp=True, sources=fastv_sources,
                                   scoring_flops=fastv_scoring_flops))
