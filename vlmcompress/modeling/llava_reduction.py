"""Visual-token reduction for LLaVA-style models, rebuilt from the checkpoint's `token_reduction` block.

- FastV (Chen et al., ECCV 2024), `algorithm: fastv`: drops the least attended image tokens inside the language model.
- VisionZip (Yang et al., 2024), `algorithm: visionzip`, and LLaVA-PruMerge (Shang et al., 2024),
  `algorithm: prumerge`: reduce the image tokens at the output of the vision encoder's feature layer (LLaVA's
  `vision_feature_layer`), as reducers of `reduction.py`'s registry (the reducing encoder layers hand them the
  class token's attention row and the keys); the language model then receives fewer image tokens, and the LLaVA
  class shortens the processor's placeholder runs to match.

FastV. The first `K = layer` decoder layers run on the whole prompt. At layer K (index `K - 1`) the attention of the
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

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .patching import swap_forward
from .reduction import AttentionInternals, ReductionState, Reducer, class_attention, register_reducer
from .token_ops import (fastv_keep_index, gather_tokens, iqr_outlier_count, keep_count, last_token_attention,
                        prumerge_keep_index, prumerge_merge, visionzip_merge)

LLAVA_LLM_ALGORITHMS = ("fastv",)  # algorithms that run inside the language model


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


def apply_fastv(model: nn.Module, tower: dict) -> FastVState:
    """Patch the decoder layers at `tower["layers_path"]` for FastV and hook the module at `tower["inputs_path"]`
    (the LLaVA model that receives `input_ids`) to read the image positions of every call."""
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


def apply_llm_reduction(model: nn.Module, spec: dict) -> dict[str, FastVState]:
    """Patch every language-model tower named in a checkpoint's `token_reduction` block."""
    if spec["algorithm"] != "fastv":
        raise ValueError(f"token_reduction.algorithm {spec['algorithm']!r} is not a language-model algorithm")
    return {tower["component"]: apply_fastv(model, tower) for tower in spec["towers"]}


# ----------------------------------------------------------------------------------------------------------------
# VisionZip and PruMerge: reducers of the vision tower's feature layer (run after that layer's MLP)


def _feature_layer_internals(layer, internals: AttentionInternals, state: ReductionState):
    """(class-token attention `[B, N]` averaged over heads, keys `[B, heads, N, head_dim]`) of the feature layer."""
    cls = internals.cls_attention
    if cls is None:  # the layer computes it only when its r > 0 (not so in PruMerge's adaptive mode)
        cls = class_attention(internals.queries, internals.keys, layer.self_attn.scale, None, state.class_token)
    return cls, internals.keys


def reduce_visionzip(layer, x, internals: AttentionInternals, state: ReductionState, r: int) -> torch.Tensor:
    """VisionZip at the feature layer `options["layer"]`: `[CLS, dominant, contextual]` (methods.md §8)."""
    o = state.options
    if len(state.tokens) != o["layer"]:  # state.tokens holds one entry per layer already run in this forward
        return x
    cls, keys = _feature_layer_internals(layer, internals, state)
    x, source = visionzip_merge(x, cls, keys.mean(dim=1), o["dominant"], o["contextual"], return_source=True)
    return _place(x, source, state)


def reduce_prumerge(layer, x, internals: AttentionInternals, state: ReductionState, r: int) -> torch.Tensor:
    """PruMerge(+) at the feature layer `options["layer"]`: outliers of the class-token attention (adaptive: IQR
    over the batch; fixed: a given count), each absorbing its key-similar neighbours, plus the extra token."""
    o = state.options
    if len(state.tokens) != o["layer"]:
        return x
    cls, keys = _feature_layer_internals(layer, internals, state)
    b, _, n, _ = keys.shape
    attn = cls[:, 1:]
    if o["mode"] == "adaptive":
        outliers = iqr_outlier_count(attn)
        total = min(n - 1, 4 * outliers) if o["plus"] else outliers  # PruMerge+: about 3 stride points per outlier
    else:
        outliers, total = o["outliers"], o["selected"]
    if o.get("keep_positions") and o["extra_token"]:
        # the extra token needs a free position: at least one patch must be dropped
        outliers, total = min(outliers, n - 2), min(total, n - 2)
    keep = prumerge_keep_index(attn, outliers, total)
    full_keys = keys.transpose(1, 2).reshape(b, n, -1)  # PruMerge compares full-width keys
    x = prumerge_merge(x, cls, full_keys, keep, o["neighbours"], o["extra_token"])
    source = [torch.zeros_like(keep[:, :1]), keep + 1]
    if o["extra_token"]:  # it sums the dropped patches: it stands where the first dropped patch stood
        dropped = torch.ones_like(attn, dtype=torch.int8).scatter(1, keep, 0)
        source.append(dropped.argmax(dim=1, keepdim=True) + 1)
    return _place(x, torch.cat(source, dim=1), state)


def _place(x: torch.Tensor, source: torch.Tensor, state: ReductionState) -> torch.Tensor:
    """Record where each token stands (`state.source_index`); with `keep_positions`, order the tokens by it, so that
    LLaVA can hand them to the language model at their original positions (in order)."""
    if state.options.get("keep_positions"):
        order = source.argsort(dim=1)
        x, source = gather_tokens(x, order), source.gather(1, order)
    state.source_index = source
    return x


def kept_placeholder_mask(input_ids: torch.Tensor, token_id: int, full: int, offsets: torch.Tensor) -> torch.Tensor:
    """`[B, L]` bool: True for every non-placeholder token and for the placeholders whose offset in their image's run
    is among that image's kept `offsets` (`[num_images, k]`, images in the row-major order of the runs), so that
    selecting with it shortens a processor's prompt to the reduced image tokens at their original places.

    Runs hold `full` placeholders each (adjacent images' runs are told apart by counting).
    """
    is_placeholder = input_ids == token_id
    seen = is_placeholder.long().cumsum(dim=1)
    before_run = torch.cummax(torch.where(is_placeholder, torch.zeros_like(seen), seen), dim=1).values
    index = ((seen - before_run - 1) % full).clamp_min(0)
    run_id = (is_placeholder & (index == 0)).flatten().long().cumsum(0).view_as(input_ids) - 1
    if int(run_id.max()) + 1 != offsets.shape[0]:
        raise ValueError(f"the prompt holds {int(run_id.max()) + 1} image placeholder runs but {offsets.shape[0]} "
                         "images were encoded")
    table = torch.zeros(offsets.shape[0], full, dtype=torch.bool, device=input_ids.device).scatter(1, offsets, True)
    return ~is_placeholder | table[run_id.clamp_min(0), index]


register_reducer(Reducer("visionzip", reduce_visionzip, cls_attention=True, after_mlp=True))
register_reducer(Reducer("prumerge", reduce_prumerge, cls_attention=True, after_mlp=True))
