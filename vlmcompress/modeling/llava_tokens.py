"""What the LLaVA-side reducers share: the feature layer's attention internals, where each kept image token stands,
and the prompt edits that follow (placeholder runs shortened, or masked to the kept tokens at their positions).

VisionZip and PruMerge reduce the image tokens at the output of the vision encoder's feature layer (LLaVA's
`vision_feature_layer`); the language model then receives fewer image tokens, and the LLaVA class of
`modeling_vlmcompress.py` shortens the processor's placeholder runs to match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reduction import AttentionInternals, ReductionState, class_attention
from .spec import token_reduction
from .token_ops import gather_tokens


def image_tokens_per_image(config) -> int:
    """Image tokens per image in the language model's input, unreduced: one per patch, plus the class token with
    the "full" feature strategy ("default" drops it)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (0 if config.vision_feature_select_strategy == "default" else 1)


def feature_layer_index(config) -> int:
    """Index into the vision tower's hidden states that LLaVA hands to the projector (0 = the patch embeddings,
    i = the output of encoder layer i - 1); ValueError for a list of feature layers."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"token reduction supports a single int vision_feature_layer, not {layer!r}")
    return layer % (config.vision_config.num_hidden_layers + 1)  # hidden_states[0] is the embedding output


def llava_image_token_counts(config) -> tuple[int, int]:
    """(placeholders the processor writes per image, image tokens the reduced vision tower hands to the LLM)."""
    full = image_tokens_per_image(config)
    spec = token_reduction(config)
    vision = None if spec is None else spec.tower("vision")
    if vision is None:
        return full, full
    applied = feature_layer_index(config)
    tokens = vision.tokens_per_layer[applied - 1] if applied > 0 else vision.num_tokens
    drop_cls = 1 if config.vision_feature_select_strategy == "default" else 0
    return full, tokens - drop_cls


def feature_layer_internals(layer, internals: AttentionInternals, state: ReductionState):
    """(class-token attention `[B, N]` averaged over heads, keys `[B, heads, N, head_dim]`) of the feature layer."""
    cls = internals.cls_attention
    if cls is None:  # the layer computes it only when its r > 0 (not so in PruMerge's adaptive mode)
        cls = class_attention(internals.queries, internals.keys, layer.self_attn.scale, None, state.class_token)
    return cls, internals.keys


def place_tokens(x: torch.Tensor, source: torch.Tensor, state: ReductionState) -> torch.Tensor:
    """Record where each token stands (`state.source_index`); with `keep_positions`, order the tokens by it, so that
    LLaVA can hand them to the language model at their original positions (in order)."""
    if state.options.get("keep_positions"):
        order = source.argsort(dim=1)
        x, source = gather_tokens(x, order), source.gather(1, order)
    state.source_index = source
    return x


def kept_sources(state: ReductionState) -> torch.Tensor | None:
    """`[B, N', N0]` bool: the input token each output token stands at (`state.source_index`; a merged token is
    shown at the token it was placed at)."""
    if state.source_index is None:
        return None
    return F.one_hot(state.source_index, state.num_tokens_in).bool()


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
