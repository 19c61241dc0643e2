"""Token reduction inside encoder layers, rebuilt from the checkpoint's `token_reduction` block.

One patching mechanism serves every per-layer algorithm: the layers of a pre-norm encoder (`layer_norm1`,
`self_attn`, `layer_norm2`, `mlp`: the CLIP, SigLIP, BLIP and BLIP-2 layout) get a reducing forward by class swap.
That forward computes attention itself so that it can (1) hand the algorithm the attention internals it asks for
(keys and queries of every head, the class token's attention row) without a second projection and without forcing
eager attention, (2) add proportional attention (`log(size)` as a key bias, compatible with SDPA), and (3) work on
towers whose heads were pruned. The algorithm is a `Reducer` looked up by name in `REDUCERS`, registered by its own
file (`tome.py`, `turbo.py`, ...; `algorithms.py` imports them); it runs after the attention residual and before
the MLP (methods.md §1), or after the MLP (`after_mlp`). A reducer declares what else it needs through hooks, never by name
here: learned per-layer modules (`setup_layer`), tokens it adds to the sequence for the layer (`enter_layer` /
`leave_layer`), towers of another kind that it patches itself (`tower_kinds`), or a whole other patching (`patch`).

Per-call state (token sizes, tokens per layer, CrossGET's cross token, the text tower's padding and end-of-text
positions) lives in one `ReductionState` per tower, reset by a pre-hook at the start of every forward of the tower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .patching import swap_forward
from .spec import FIRST_VARIANT, TextTowerSpec, TokenReductionSpec, TowerSpec
from .token_ops import compute_dtype


@dataclass
class ReductionState:
    """Per-forward state of one tower, shared by all its reducing layers.

    `options` holds the algorithm's knobs from the checkpoint (e.g. Turbo's alpha); `text` describes a text tower
    (a `TextTowerSpec`: causal or not, how it finds the end-of-text token), None for a vision tower.
    """

    algorithm: str
    class_token: bool
    proportional_attention: bool
    options: dict[str, Any] = field(default_factory=dict)
    variant: int = FIRST_VARIANT  # the version of the algorithm's computation the checkpoint was written with (spec.py)
    text: TextTowerSpec | None = None
    trace_source: bool = False
    size: torch.Tensor | None = None  # [B, N, 1] original tokens per token
    source: torch.Tensor | None = None  # [B, N, N0] which original tokens each token holds (visualisation)
    num_tokens_in: int = 0  # tokens entering the first layer in the last forward
    tokens: list[int] = field(default_factory=list)  # tokens after each layer in the last forward
    merging_layers: int = 0  # layers that had r > 0 so far in this forward (Turbo's layer counter)
    cross: torch.Tensor | None = None  # [B, 1, D] CrossGET's cross token after the previous layer
    valid: torch.Tensor | None = None  # [B, N] bool: not padding (text towers)
    eot: torch.Tensor | None = None  # [B, N] bool: the end-of-text token (text towers)
    old_to_new: torch.Tensor | None = None  # [B, N0] current index of every input token (order-preserving towers)
    # [B, N'] input-token index each token stands at after a single-point reduction (VisionZip / PruMerge), for
    # LLaVA to give the kept image tokens their original position ids
    source_index: torch.Tensor | None = None
    # [B] image tokens of each row of the reduced output when rows keep different counts (PruMerge's per-image
    # adaptive count; the rows are padded at the end), else None
    row_tokens: torch.Tensor | None = None
    layers: tuple = ()  # the tower's layers, for a reducer that reads the layer after its own (PruMerge)

    def reset(self) -> None:
        self.size, self.source, self.tokens, self.merging_layers = None, None, [], 0
        self.cross, self.valid, self.eot, self.old_to_new = None, None, None, None
        self.source_index, self.row_tokens = None, None


@dataclass
class AttentionInternals:
    """What a reducer may read from the layer's attention: `queries` / `keys` `[B, heads, N, head_dim]`, the
    class token's attention row averaged over heads `[B, N]` (only when the reducer asks for it), the additive
    attention `bias` the layer used (broadcastable to `[B, heads, N, N]`, or None) and its `scale`."""

    queries: torch.Tensor
    keys: torch.Tensor
    cls_attention: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    scale: float | None = None


@dataclass(frozen=True)
class Reducer:
    """A token reduction algorithm, as the shipped modeling code runs it.

    `reduce(layer, x, internals, state, r) -> x` maps `[B, N, D]` to `[B, N - r', D]` and updates `state.size`
    (and `state.source`, `state.old_to_new` where it tracks them). Flags: `cls_attention` (needs the class token's
    attention row), `order_preserving` (survivors keep their order; needed for text towers), `data_dependent` (the
    token count depends on the input, so the graph cannot be exported with fixed shapes), `after_mlp` (reduce the
    layer's output instead, after its MLP: VisionZip and PruMerge reduce the output of LLaVA's feature layer).

    Hooks (all optional):
        setup_layer(layer): add the learned per-layer modules the algorithm needs (CrossGET's cross token), at
            patching time, before the weights load, so they are part of the state dict.
        enter_layer(layer, x, state) -> x / leave_layer(layer, x, state) -> x: change the sequence around one
            layer (CrossGET appends its cross token before attention and takes it off after the MLP).
        tower_kinds: `{kind: patch(model, tower, options) -> state}` for checkpoint towers with a `kind` that are
            not encoder layers (Turbo's pruning of image tokens in BLIP's text encoder).
        counted: `{kind: (stream, description)}`: what the token counts of such a tower count, when it is not the
            tower's own tokens (`("image", "image tokens read by cross-attention")`), for reports.
        patch(model, tower, options) -> state: patch a tower entirely by itself (FastV: the decoder layers of the
            language model); `reduce` is then unused.
        sources(state) -> `[B, N', N0]` bool or None: which input tokens each output token holds after the last
            forward (merge sources, or the kept input indices as one-hot rows), for reports' pictures; see
            `token_sources`.

    For the plan-time FLOPs estimate (`vlmcompress.measure.estimate`): `added_tokens` the reducer appends to the
    sequence for every layer (CrossGET's cross token), and `scoring_flops(n, r, shape, options) -> int` the FLOPs
    of the matmuls its own scoring runs in a layer entered by `n` tokens that removes `r` (`shape`: the layer's
    `LayerShape` widths), so that the estimate equals what `FlopCounterMode` counts.
    """

    name: str
    reduce: Callable[..., torch.Tensor] | None = None
    cls_attention: bool = False
    order_preserving: bool = False
    data_dependent: bool = False
    after_mlp: bool = False
    setup_layer: Callable[[nn.Module], None] | None = None
    enter_layer: Callable[..., torch.Tensor] | None = None
    leave_layer: Callable[..., torch.Tensor] | None = None
    tower_kinds: dict[str, Callable[..., Any]] = field(default_factory=dict)
    counted: dict[str, tuple[str, str]] = field(default_factory=dict)
    patch: Callable[..., Any] | None = None
    sources: Callable[[Any], torch.Tensor | None] | None = None
    added_tokens: int = 0
    scoring_flops: Callable[..., int] | None = None


REDUCERS: dict[str, Reducer] = {}


def register_reducer(reducer: Reducer) -> Reducer:
    """Register `reducer` under its name; checked like the method registry: a name is taken once (registering the
    same reducer again, as a module reload does, is allowed) and a reducer needs `reduce` or `patch`."""
    if not isinstance(reducer, Reducer):
        raise TypeError(f"register_reducer takes a Reducer, got {type(reducer).__name__}")
    if reducer.reduce is None and reducer.patch is None:
        raise ValueError(f"reducer {reducer.name!r} needs a reduce function or a patch function")
    known = REDUCERS.get(reducer.name)
    if known is not None and known != reducer and _qualname(known) != _qualname(reducer):
        raise ValueError(f"token-reduction algorithm {reducer.name!r} is already registered by "
                         f"{_qualname(known)}; choose another name")
    REDUCERS[reducer.name] = reducer
    return reducer


def counted_tokens(algorithm: str, tower: TowerSpec) -> tuple[str | None, str]:
    """(stream, description) of the tokens a checkpoint tower's counts count: `(None, "tokens")` for its own."""
    reducer = REDUCERS.get(algorithm)
    if reducer is None or tower.kind not in reducer.counted:
        return None, "tokens"
    return reducer.counted[tower.kind]


def _qualname(reducer: Reducer) -> str:
    fn = reducer.reduce or reducer.patch
    return f"{fn.__module__.rpartition('.')[2]}.{fn.__qualname__}"


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
    return logits.to(compute_dtype(logits)).softmax(dim=-1).mean(dim=1)[:, 0].to(q.dtype)


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
    return out_proj(out.transpose(1, 2).reshape(b, n, -1)), AttentionInternals(q, k, cls, bias, attn.scale)


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
    if state.text is not None and (state.text.causal or state.valid is not None):
        allowed = torch.ones(1, 1, n, n, dtype=torch.bool, device=device)
        if state.text.causal:
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
    if not state.tokens:
        state.num_tokens_in = x.shape[1]
    if reducer.order_preserving and state.old_to_new is None:
        state.old_to_new = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    if reducer.enter_layer is not None:
        x = reducer.enter_layer(self, x, state)
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
    if reducer.leave_layer is not None:
        x = reducer.leave_layer(self, x, state)
    state.tokens.append(x.shape[1])
    if self._vlmc_last and state.text is not None and state.old_to_new is not None:
        x = x.gather(1, state.old_to_new[..., None].expand(-1, -1, x.shape[-1]))
    return x


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


def end_of_text_mask(input_ids: torch.Tensor, text: TextTowerSpec) -> torch.Tensor:
    """`[B, L]` bool, True at the token the text tower pools: the first `eos_token_id` (CLIP), the largest id
    (legacy CLIP configs with `eos_token_id == 2`) or the last position (SigLIP)."""
    b, n = input_ids.shape
    if text.eot == "last":
        index = torch.full((b,), n - 1, device=input_ids.device)
    elif text.eot == "argmax":
        index = input_ids.int().argmax(dim=-1)
    else:
        index = (input_ids == text.eos_token_id).int().argmax(dim=-1)
    return F.one_hot(index, n).bool()


def patch_tower(model: nn.Module, tower: TowerSpec, algorithm: str = "tome", options: dict | None = None,
                variant: int = FIRST_VARIANT) -> Any:
    """Turn the encoder layers at `tower.layers_path` into reducing layers with per-layer `tower.r` (or hand the
    tower to the reducer's own patcher for its `kind`, or for the whole algorithm)."""
    tower = TowerSpec.read(tower)
    if algorithm not in REDUCERS:
        raise ValueError(f"token_reduction.algorithm {algorithm!r} is not supported by this modeling code "
                         f"(supported: {', '.join(REDUCERS)})")
    reducer = REDUCERS[algorithm]
    if tower.kind is not None:
        if tower.kind not in reducer.tower_kinds:
            raise ValueError(f"token_reduction tower kind {tower.kind!r} is not supported by {algorithm}")
        return reducer.tower_kinds[tower.kind](model, tower, options)
    if reducer.patch is not None:
        return reducer.patch(model, tower, options)
    layers = model.get_submodule(tower.layers_path)
    text = tower.text
    state = ReductionState(algorithm=algorithm, class_token=bool(tower.class_token),
                           proportional_attention=bool(tower.proportional_attention), options=dict(options or {}),
                           variant=int(variant), text=text, layers=tuple(layers))
    for i, (layer, r) in enumerate(zip(layers, tower.r)):
        swap_forward(layer, reducing_layer_forward, "TokenReducing")
        layer._vlmc_state = state
        layer._vlmc_r = int(r)
        layer._vlmc_last = i == len(layers) - 1
        if reducer.setup_layer is not None:
            reducer.setup_layer(layer)
    hook_path = tower.hook_path or tower.layers_path.rpartition(".")[0]
    owner = model.get_submodule(hook_path)
    if getattr(owner, "_vlmc_hook", None) is not None:
        owner._vlmc_hook.remove()
    owner._vlmc_state = state
    hook = _text_reset_hook(state) if text is not None else _vision_reset_hook(state)
    owner._vlmc_hook = owner.register_forward_pre_hook(hook, with_kwargs=True)
    return state


def token_sources(model: nn.Module, trace: bool | None = None) -> dict[str, torch.Tensor]:
    """`{component: [B, N', N0] bool}` after a forward: which input tokens each output token of every reduced tower
    holds (merge sources, or the kept input positions), from the algorithm's `sources` hook. Call it with
    `trace=True` before a forward to make the merging algorithms track full source maps (off by default: it costs
    O(N0) memory per token); it then returns {}."""
    algorithm, states = getattr(model, "_vlmc_reduction", (None, {}))
    reducer = REDUCERS.get(algorithm)
    out = {}
    for component, state in states.items():
        if trace is not None:
            if hasattr(state, "trace_source"):
                state.trace_source = trace
            continue
        sources = None if reducer is None or reducer.sources is None else reducer.sources(state)
        if sources is not None:
            out[component] = sources
    return out


def apply_token_reduction(model: nn.Module, spec) -> dict[str, Any]:
    """Patch every tower named in a checkpoint's `token_reduction` block (a dict or a `TokenReductionSpec`); returns
    the state per component (also kept on the model, for `token_sources`)."""
    spec = TokenReductionSpec.read(spec)
    if spec is None:
        return {}
    states = {}
    for tower in spec.towers:
        state = patch_tower(model, tower, spec.algorithm, spec.options, spec.variant)
        if tower.kind is None:
            states[tower.component] = state
    model._vlmc_reduction = (spec.algorithm, states)
    return states
