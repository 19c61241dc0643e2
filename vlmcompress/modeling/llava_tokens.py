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


def class_token_to_llm(config) -> bool:
    """Whether the language model receives the vision tower's class token: with the "full" feature strategy, or when
    the token reduction hands it on (VisionZip: the class token is one of its `dominant` tokens)."""
    if config.vision_feature_select_strategy != "default":
        return True
    spec = token_reduction(config)
    return spec is not None and bool(spec.options.get("class_token_to_llm"))


def feature_select_strategy(config) -> str:
    """The strategy LLaVA's `get_image_features` runs with: "full" (keep the class token) when the reduction hands
    the class token on under the "default" strategy, else the config's."""
    return "full" if class_token_to_llm(config) else config.vision_feature_select_strategy


def llava_image_token_counts(config) -> tuple[int, int]:
    """(placeholders the processor writes per image, image tokens the reduced vision tower hands to the LLM)."""
    full = image_tokens_per_image(config)
    spec = token_reduction(config)
    vision = None if spec is None else spec.tower("vision")
    if vision is None:
        return full, full
    applied = feature_layer_index(config)
    tokens = vision.tokens_per_layer[applied - 1] if applied > 0 else vision.num_tokens
    return full, tokens - (0 if class_token_to_llm(config) else 1)


def image_token_offsets(config, source: torch.Tensor) -> torch.Tensor:
    """`[images, k]`: for each image token handed to the language model, the placeholder of the full run whose
    position it takes. `source` `[images, tokens]` holds where each token of the feature layer's output stands in
    the tower's input (0 = the class token). With the "default" strategy placeholder `p - 1` belongs to patch `p`;
    a class token handed on takes the run's first placeholder (it shares that position with patch 1 when both
    are kept)."""
    if config.vision_feature_select_strategy != "default":
        return source
    if class_token_to_llm(config):
        return (source - 1).clamp_min(0)
    return source[:, 1:] - 1


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
    n = state.num_tokens_in
    source = state.source_index  # padding rows' tokens (per-image counts) carry the sentinel n
    return F.one_hot(source.clamp_max(n - 1), n).bool() & (source < n)[..., None]


def _run_index(input_ids: torch.Tensor, token_id: int, full: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(`is_placeholder`, index of each placeholder inside its run, run number in row-major order) `[B, L]` each;
    runs hold `full` placeholders (adjacent images' runs are told apart by counting)."""
    is_placeholder = input_ids == token_id
    # placeholders seen so far minus those seen before the run began
    seen = is_placeholder.long().cumsum(dim=1)
    before_run = torch.cummax(torch.where(is_placeholder, torch.zeros_like(seen), seen), dim=1).values
    index = ((seen - before_run - 1) % full).clamp_min(0)
    run_id = (is_placeholder & (index == 0)).flatten().long().cumsum(0).view_as(input_ids) - 1
    return is_placeholder, index, run_id


def placeholder_keep_mask(input_ids: torch.Tensor, token_id: int, full: int,
                          keep: int | torch.Tensor) -> torch.Tensor:
    """`[B, L]` bool: every non-placeholder token, and the first `keep` placeholders of every run of `full` (`keep`:
    one count, or a count per image `[num_images]` in the row-major order of the runs)."""
    return _keep_first(*_run_index(input_ids, token_id, full), keep)


def _keep_first(is_placeholder: torch.Tensor, index: torch.Tensor, run_id: torch.Tensor,
                keep: int | torch.Tensor) -> torch.Tensor:
    """`placeholder_keep_mask` from the `_run_index` of a prompt."""
    if isinstance(keep, torch.Tensor):
        runs = int(run_id.max()) + 1 if bool(is_placeholder.any()) else 0
        if runs != keep.shape[0]:
            raise ValueError(f"the prompt holds {runs} image placeholder runs but {keep.shape[0]} images were encoded")
        keep = keep.to(index.device)[run_id.clamp_min(0)]
    return ~is_placeholder | (index < keep)


def kept_image_positions(input_ids: torch.Tensor, position_ids: torch.Tensor, token_id: int, full: int,
                         offsets: torch.Tensor, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the reduced image tokens stand in a full prompt, for `keep_positions`.

    Every run of `full` placeholders keeps its first `k` placeholders (k = `counts[image]`, or `offsets.shape[1]`);
    the j-th kept one takes the position id of the run's placeholder `offsets[image, j]`; text keeps its own
    position ids.

    Args:
        input_ids, position_ids: `[B, L]`, the full prompt and the position ids the stock model would give it.
        offsets: `[num_images, k]` ([`image_token_offsets`]), images in the row-major order of the runs.
        counts: `[num_images]` image tokens of each image when they differ (entries past them are padding).
    Returns:
        (`[B, L]` bool: the tokens to keep; `[B, L]` position ids, to be selected with it).
    """
    k = offsets.shape[1]
    counts = torch.full((offsets.shape[0],), k, device=offsets.device) if counts is None else counts
    is_placeholder, index, run_id = _run_index(input_ids, token_id, full)
    keep = _keep_first(is_placeholder, index, run_id, counts)
    # the j-th placeholder of a run stands at run start + j: move it to run start + offsets[image, j]
    shift = offsets - torch.arange(k, device=offsets.device)
    kept_image = is_placeholder & keep
    moved = torch.zeros_like(position_ids)
    moved[kept_image] = shift[run_id[kept_image], index[kept_image]].to(position_ids.dtype)
    return keep, position_ids + moved


def select_prompt_tokens(kept: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         position_ids: torch.Tensor | None, labels: torch.Tensor | None,
                         pad_token_id: int = 0) -> tuple[torch.Tensor | None, ...]:
    """The tokens `kept` (`[B, L]` bool) of a prompt and of its aligned tensors, `[B, L']` each.

    Rows that keep the same number of tokens are selected as they are. Rows that keep different numbers (images
    with their own token counts) are left-padded to the longest: padding gets `pad_token_id`, attention mask 0,
    label -100 and position 0, and, when no position ids were given, the rows get the position ids the stock model
    gives an unpadded prompt (`cumsum(mask) - 1`), so that each row computes what it computes alone.
    """
    b = kept.shape[0]
    lengths = kept.sum(dim=1)
    if bool((lengths == lengths[0]).all()):
        return tuple(None if t is None else t.expand_as(kept)[kept].view(b, -1) if t.dim() == 2 else
                     t[kept].view(b, -1, *t.shape[2:]) for t in (input_ids, attention_mask, position_ids, labels))
    longest = int(lengths.max())
    order = kept.long().argsort(dim=1, stable=True)[:, -longest:]  # dropped tokens first: the kept ones end a row
    real = kept.gather(1, order)

    def take(t: torch.Tensor, fill: int) -> torch.Tensor:
        return t.expand_as(kept).gather(1, order).masked_fill(~real, fill)

    mask = take(torch.ones_like(input_ids) if attention_mask is None else attention_mask, 0)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0) if position_ids is None else take(position_ids, 0)
    return take(input_ids, pad_token_id), mask, positions, None if labels is None else take(labels, -100)


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
    is_placeholder, index, _ = _run_index(input_ids, token_id, full)
    keep_mask = ~is_placeholder | (index < keep)
    kept = keep_mask.sum(dim=1)
    if not bool((kept == kept[0]).all()):
        raise ValueError("every row of the batch must hold the same number of images for token reduction")
    new_len = int(kept[0])
    out = [input_ids[keep_mask].view(input_ids.shape[0], new_len)]
    for t in aligned:
        out.append(None if t is None else t[keep_mask].view(t.shape[0], new_len, *t.shape[2:]))
    return tuple(out)
