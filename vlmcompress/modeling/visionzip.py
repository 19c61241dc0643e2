"""VisionZip (Yang et al., 2024), `algorithm: visionzip`: at the output of LLaVA's feature layer keep `dominant`
tokens (the class token and the `dominant - 1` patches with the highest class-token attention) and `contextual`
tokens, each an anchor patch plus the mean of the remaining patches most key-similar to it (methods.md §8); the
class token goes on to the projector, so the language model receives `dominant + contextual` image tokens, as in
the paper's code. Runs after the feature layer's MLP (`after_mlp`).

Variant 1 checkpoints (written before variant 2) keep what they computed: `dominant` patches besides the class
token, contextual tokens averaging their anchor with the joined patches, and the class token dropped for the
language model under the "default" feature strategy.
"""

from __future__ import annotations

import torch

from .llava_tokens import feature_layer_internals, kept_sources, place_tokens
from .reduction import AttentionInternals, Reducer, ReductionState, register_reducer
from .token_ops import compute_dtype, gather_tokens


def visionzip_merge(
    hidden_states: torch.Tensor,
    cls_attention: torch.Tensor,
    metric: torch.Tensor,
    dominant_patches: int,
    contextual: int,
    return_source: bool = False,
    average_anchor: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """
    VisionZip: keep the class token, the `dominant_patches` patches the class token attends to most, and
    `contextual` tokens that each hold a group of the remaining patches grouped by similarity.

    The remaining patches (original order) are split into `contextual` anchors, taken at a uniform stride
    `max(1, remaining // contextual)` from the first, and the others, each of which joins the anchor whose `metric`
    is most similar (cosine; ties to the earlier anchor). A contextual token is its anchor plus the mean of the
    patches that joined it, `x_anchor + sum(joined) / max(1, count)` (the paper's code,
    dvlab-research/VisionZip `visionzip/clip_encoder.py`); `average_anchor=True` is the mean of the anchor and the
    joined patches, `(x_anchor + sum(joined)) / (1 + count)` (what checkpoints of variant 1 computed).

    Args:
        hidden_states (`torch.Tensor` of shape `(batch_size, num_tokens, dim)`):
            Tokens of the feature layer; index 0 is the class token.
        cls_attention (`torch.Tensor` of shape `(batch_size, num_tokens)`):
            Attention of the class-token query to every token (summed or averaged over heads: same ranking).
        metric (`torch.Tensor` of shape `(batch_size, num_tokens, channels)`):
            Similarity features (the layer's keys averaged over heads).
        dominant_patches (`int`), contextual (`int`):
            Counts, clamped to `0 <= dominant_patches <= num_tokens - 1` and
            `0 <= contextual <= num_tokens - 1 - dominant_patches`. VisionZip's `dominant` counts the class token:
            `dominant_patches = dominant - 1`.
        return_source (`bool`, *optional*, defaults to `False`):
            Also return where each output token stands in the input: `(batch_size, 1 + dominant_patches +
            contextual)`, long (0 for the class token, a contextual token at its anchor's index).

    Returns:
        `torch.Tensor` of shape `(batch_size, 1 + dominant_patches + contextual, dim)`: `[class token, dominant
        patches in original order, contextual tokens in the original order of their anchors]`, computed in
        `compute_dtype` and returned in the input dtype. Equal attention goes to the earlier patch.
    """
    batch_size, num_tokens, dim = hidden_states.shape
    patches = num_tokens - 1
    dominant = max(0, min(int(dominant_patches), patches))
    contextual = max(0, min(int(contextual), patches - dominant))
    dtype = compute_dtype(hidden_states, cls_attention, metric)
    with torch.no_grad():
        order = cls_attention[:, 1:].to(dtype).argsort(dim=1, descending=True, stable=True) + 1
        dom = order[:, :dominant].sort(dim=1).values
        rest = order[:, dominant:].sort(dim=1).values  # [B, R] positions of the other patches, original order
    parts = [hidden_states[:, :1], gather_tokens(hidden_states, dom)]
    # the class token's source entry from the shape alone: `dom[:, :1]` is empty when no patch is dominant
    source = [torch.zeros(batch_size, 1, dtype=torch.long, device=hidden_states.device), dom]
    if contextual > 0:
        remaining = rest.shape[1]
        step = max(1, remaining // contextual)
        # index lists built from shapes only (no boolean-mask indexing), so the graph has static shapes for export
        anchor_idx = list(range(0, step * contextual, step))
        other_idx = [i for i in range(remaining) if i % step or i >= step * contextual]
        anchors = rest[:, torch.tensor(anchor_idx, device=rest.device)]
        others = rest[:, torch.tensor(other_idx, dtype=torch.long, device=rest.device)]
        x_anchor = gather_tokens(hidden_states, anchors).to(dtype)
        sums = torch.zeros_like(x_anchor)
        counts = torch.zeros(batch_size, contextual, 1, dtype=dtype, device=hidden_states.device)
        if others.shape[1] > 0:
            with torch.no_grad():
                m = metric.to(dtype)
                unit = m / m.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
                sim = gather_tokens(unit, others) @ gather_tokens(unit, anchors).transpose(1, 2)  # [B, R - c, c]
                assign = sim.argmax(dim=-1, keepdim=True)  # [B, R - c, 1]: first maximum wins ties
            x_other = gather_tokens(hidden_states, others).to(dtype)
            sums = sums.scatter_add(1, assign.expand(-1, -1, dim), x_other)
            counts = counts.scatter_add(1, assign, torch.ones_like(assign, dtype=dtype))
        if average_anchor:
            merged = (x_anchor + sums) / (1 + counts)
        else:
            merged = x_anchor + sums / counts.clamp_min(1)
        parts.append(merged.to(hidden_states.dtype))
        source.append(anchors)
    out = torch.cat(parts, dim=1)
    return (out, torch.cat(source, dim=1)) if return_source else out


def dominant_patches(options: dict) -> int:
    """Patches kept by class-token attention. With `class_token_to_llm` (VisionZip's convention, every block since
    variant 2) the class token is one of the `dominant` tokens (the paper's `dominant_num = dominant - 1`) and goes on
    to the projector; blocks of variant 1 counted patches only and let LLaVA's feature strategy drop the class
    token."""
    return options["dominant"] - int(bool(options.get("class_token_to_llm")))


def reduce_visionzip(layer, x, internals: AttentionInternals, state: ReductionState, r: int) -> torch.Tensor:
    """VisionZip at the feature layer `options["layer"]`: `[CLS, dominant - 1 patches, contextual]` (methods.md §8);
    variant 1: `[CLS, dominant patches, contextual (anchor averaged in)]`."""
    o = state.options
    if len(state.tokens) != o["layer"]:  # state.tokens holds one entry per layer already run in this forward
        return x
    cls, keys = feature_layer_internals(layer, internals, state)
    x, source = visionzip_merge(x, cls, keys.mean(dim=1), dominant_patches(o), o["contextual"],
                                return_source=True, average_anchor=state.variant < 2)
    return place_tokens(x, source, state)


def visionzip_scoring_flops(n: int, r: int, shape, options: dict) -> int:
    """FLOPs of the contextual assignment at the feature layer: the patches left after the dominant ones, minus
    the `contextual` anchors, against the anchors (head-averaged keys)."""
    remaining = n - 1 - dominant_patches(options)
    contextual = options["contextual"]
    others = remaining - contextual if contextual > 0 else 0
    return 2 * others * contextual * shape.head_dim


REDUCER = register_reducer(Reducer("visionzip", reduce_visionzip, cls_attention=True, after_mlp=True,
                                   sources=kept_sources, scoring_flops=visionzip_scoring_flops))
