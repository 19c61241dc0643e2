"""The arithmetic of the papers' own code, pinned on cases small enough to check by hand (at most 6 tokens × 2
dimensions, integer or dyadic inputs; the derivation is in each docstring).

Sources: dvlab-research/VisionZip `visionzip/clip_encoder.py` and `main.py`; 42Shawn/LLaVA-PruMerge
`llava/model/multimodal_encoder/clip_encoder.py`; sdc17/CrossGET `LLaVA/llava/model/reducer.py` and
`LLaVA/llava/model/multimodal_encoder/modeling_clip.py`. Each case marked "98808e1" fails on that commit (the
deviations of issue 16). Every case runs at float32 and float64: the kernels compute in
`promote_types(dtype, float32)`, so float64 inputs give float64 results.
"""

import math

import pytest
import torch

from vlmcompress.modeling.crossget import complete_graph_soft_matching, received_attention_importance
from vlmcompress.modeling.prumerge import (adaptive_keep_count, attention_order, paper_keep_index,
                                           prumerge_class_attention, prumerge_merge, prumerge_plus_points)
from vlmcompress.modeling.token_ops import compute_dtype
from vlmcompress.modeling.visionzip import visionzip_merge

DTYPES = [torch.float32, torch.float64]


def t(values, dtype):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compute_dtype_keeps_float64_and_lifts_half_precision(dtype):
    assert compute_dtype(torch.zeros(1, dtype=dtype)) == dtype
    assert compute_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert compute_dtype(torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=dtype)) == dtype


# ----------------------------------------------------------------------------------------------------------------
# VisionZip


@pytest.mark.parametrize("dtype", DTYPES)
def test_visionzip_dominant_counts_cls_and_contextual_is_anchor_plus_mean(dtype):
    """CLS + 5 patches, x = [CLS (8, 8), p1 (1, 0), p2 (2, 0), p3 (0, 4), p4 (4, 0), p5 (0, 2)], CLS attention
    (_, 1/8, 1/2, 1/16, 1/4, 1/16), `dominant = 2, contextual = 2` (98808e1: dominant = 2 patches).

    The paper: `dominant_num = dominant - 1 = 1` patch: p2 (attention 1/2). Remaining, original order: p1, p3, p4,
    p5; step = 4 // 2 = 2, anchors at 0 and 2: p1, p4. Metric p1 (1, 0), p3 (1, 1/2), p4 (0, 1), p5 (0, 1): p3 is
    nearer p1 (cos 2/√5 vs 1/√5), p5 is p4. Contextual: p1 + mean(p3) = (1, 4); p4 + mean(p5) = (4, 2).
    Output [CLS, p2, (1, 4), (4, 2)]: dominant + contextual = 4 tokens, sources [0, 2, 1, 4]."""
    x = t([[[8, 8], [1, 0], [2, 0], [0, 4], [4, 0], [0, 2]]], dtype)
    attn = t([[0, 1 / 8, 1 / 2, 1 / 16, 1 / 4, 1 / 16]], dtype)
    metric = t([[[1, 1], [1, 0], [0, 1], [1, 0.5], [0, 1], [0, 1]]], dtype)
    out, source = visionzip_merge(x, attn, metric, dominant_patches=2 - 1, contextual=2, return_source=True)
    assert out.dtype == dtype
    assert out[0].tolist() == [[8, 8], [2, 0], [1, 4], [4, 2]]
    assert source.tolist() == [[0, 2, 1, 4]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_visionzip_contextual_token_with_two_joined_patches(dtype):
    """CLS + 4 patches, no dominant patch, one contextual token: anchor p1 (1, 0) joined by p2 (0, 4), p3 (2, 0)
    and p4 (1, 2) (one group: every metric equal). The paper: p1 + (p2 + p3 + p4) / 3 = (1, 0) + (1, 2) = (2, 2).
    98808e1 (and variant 1, `average_anchor`): (p1 + p2 + p3 + p4) / 4 = (1, 1.5)."""
    x = t([[[8, 8], [1, 0], [0, 4], [2, 0], [1, 2]]], dtype)
    attn = t([[0, 1 / 4, 1 / 4, 1 / 4, 1 / 4]], dtype)
    metric = torch.ones(1, 5, 2, dtype=dtype)
    assert visionzip_merge(x, attn, metric, 0, 1)[0].tolist() == [[8, 8], [2, 2]]
    assert visionzip_merge(x, attn, metric, 0, 1, average_anchor=True)[0].tolist() == [[8, 8], [1, 1.5]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_visionzip_anchor_alone_is_itself_and_cls_source_survives_no_dominant_patch(dtype):
    """CLS + 3 patches, no dominant patch, 3 contextual tokens: every patch is its own anchor, nothing joins, so
    each contextual token is its patch (the paper divides by `max(1, count)`: anchor + 0). The source index keeps
    the CLS entry: [0, 1, 2, 3] (98808e1 built it from an empty slice: [1, 2, 3])."""
    x = t([[[8, 8], [1, 0], [0, 4], [2, 0]]], dtype)
    attn = t([[0, 1 / 2, 1 / 4, 1 / 4]], dtype)
    out, source = visionzip_merge(x, attn, torch.eye(4, 2, dtype=dtype)[None], 0, 3, return_source=True)
    assert out[0].tolist() == x[0].tolist()
    assert source.tolist() == [[0, 1, 2, 3]]


# ----------------------------------------------------------------------------------------------------------------
# PruMerge


@pytest.mark.parametrize("dtype", DTYPES)
def test_prumerge_class_attention_is_one_full_width_softmax(dtype):
    """Width C = 4 (scale C^-0.5 = 1/2), the CLS query q = (2, 0, 0, 2); keys CLS (0, 0, 0, 0), p1 (1, 0, 0, 2),
    p2 (2, 0, 0, 0). Logits q·k / 2: 0, (2 + 4) / 2 = 3, 4 / 2 = 2; softmax: (1, e³, e²) / (1 + e³ + e²).
    98808e1 averaged per-head softmaxes (2 heads of width 2, scale 2^-0.5): head 1 logits (0, √2, 2√2), head 2
    (0, 2√2, 0) — other numbers."""
    q = t([[[2, 0, 0, 2]]], dtype)
    k = t([[[0, 0, 0, 0], [1, 0, 0, 2], [2, 0, 0, 0]]], dtype)
    z = 1 + math.exp(3) + math.exp(2)
    got = prumerge_class_attention(q, k, 4)
    assert got.dtype == dtype
    torch.testing.assert_close(got, t([[1 / z, math.exp(3) / z, math.exp(2) / z]], dtype),
                               atol=1e-12 if dtype == torch.float64 else 1e-7, rtol=0)


def test_prumerge_adaptive_count_is_per_image_iqr():
    """Patch attentions (1, 1, 1, 1, 1, 9) / 14: Q1 = Q3 = 1/14 (linear interpolation), IQR = 0, bound 1/14: one
    outlier (9/14), ratio 1/6, `int(6 · 1/6) = 1` patch. All equal: no outlier, ratio 0, count 0."""
    assert adaptive_keep_count(torch.tensor([1, 1, 1, 1, 1, 9.]) / 14) == (1, 1 / 6)
    assert adaptive_keep_count(torch.full((6,), 1 / 6)) == (0, 0.0)


def test_prumerge_plus_points_follow_the_reference_stride():
    """The reference: `step_length = int(1 / ratio)`, points `arange(0, 575, int(step_length / 3))` for 576 patches,
    generalised to `range(0, P - 1, max(1, int(int(1 / ratio) / 3)))`. ratio 1/12 on 576 patches: stride 4 →
    0, 4, …, 572 (144 points); ratio 1/6 on 6 patches: stride 2 → 0, 2, 4 (5 is `P - 1`, excluded as 575 is);
    ratio 1/2 (the reference's stride 0, an error): stride 1 → 0 … P - 2."""
    assert prumerge_plus_points(1 / 12, 576) == list(range(0, 575, 4))
    assert prumerge_plus_points(1 / 6, 6) == [0, 2, 4]
    assert prumerge_plus_points(1 / 2, 6) == [0, 1, 2, 3, 4]
    assert prumerge_plus_points(0.0, 6) == [0]


def test_prumerge_keep_order_is_descending_attention_then_stride_points():
    """Attention (1/8, 1/2, 0, 1/4, 1/16, 1/16), 2 outliers: p1 (1/2), p3 (1/4), in that order (the reference's
    `topk`; 98808e1: raster order [1, 3]). PruMerge+ points 0, 2, 4: the ones not kept already follow in raster
    order: [1, 3, 0, 2, 4]. `raster=True`: [0, 1, 2, 3, 4]."""
    attn = torch.tensor([1 / 8, 1 / 2, 0, 1 / 4, 1 / 16, 1 / 16])
    assert paper_keep_index(attn, 2).tolist() == [1, 3]
    assert paper_keep_index(attn, 2, [0, 2, 4]).tolist() == [1, 3, 0, 2, 4]
    assert paper_keep_index(attn, 2, [0, 2, 4], raster=True).tolist() == [0, 1, 2, 3, 4]
    # the fixed mode (static shapes): the same order from the ascending keep index
    assert attention_order(torch.tensor([[0, 1, 2, 3, 4]]), attn[None], 2).tolist() == [[1, 3, 0, 2, 4]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_prumerge_merge_adds_attention_weighted_neighbours(dtype):
    """CLS + 4 patches x = (1, 0), (0, 2), (4, 0), (0, 8) with attention (1/2, 1/4, 1/8, 1/8); keep p1, one
    neighbour by key cosine: keys p1 (1, 0), p2 (0, 1), p3 (1, 1/4), p4 (-1, 0) → p3. Kept token: p1 + 1/8 · p3 =
    (3/2, 0). Extra token: the dropped p2, p3, p4 weighted by attention: (0, 1/2) + (1/2, 0) + (0, 1) = (1/2, 3/2)."""
    x = t([[[8, 8], [1, 0], [0, 2], [4, 0], [0, 8]]], dtype)
    attn = t([[0, 1 / 2, 1 / 4, 1 / 8, 1 / 8]], dtype)
    keys = t([[[0, 0], [1, 0], [0, 1], [1, 0.25], [-1, 0]]], dtype)
    out = prumerge_merge(x, attn, keys, torch.tensor([[0]]), neighbours=1, extra_token=True)
    assert out.dtype == dtype
    assert out[0].tolist() == [[8, 8], [1.5, 0], [0.5, 1.5]]


# ----------------------------------------------------------------------------------------------------------------
# CrossGET on LLaVA


@pytest.mark.parametrize("dtype", DTYPES)
def test_crossget_llava_importance_is_received_attention(dtype):
    """One head, 3 tokens [CLS, p1, cross], queries/keys chosen so each query row's logits are (0, 0, ln-free):
    with all keys zero every row is uniform (1/3 each). Importance of token i = mean over the non-cross queries
    (rows 0, 1) of attention to i + the cross row's attention to i = 1/3 + 1/3 = 2/3 for every token.
    A bias (log size) of ln 2 on p1 makes every row (1, 2, 1) / 4: importance of p1 = 1/2 + 1/2 = 1, others 1/2.
    (98808e1 used the cosine of each key with the cross token's query on every tower.)"""
    q = torch.zeros(1, 1, 3, 2, dtype=dtype)
    k = torch.zeros(1, 1, 3, 2, dtype=dtype)
    got = received_attention_importance(q, k, 1.0, None)
    torch.testing.assert_close(got, torch.full((1, 3), 2 / 3, dtype=dtype))
    bias = t([[[[0, math.log(2), 0]]]], dtype)
    got = received_attention_importance(q, k, 1.0, bias)
    torch.testing.assert_close(got, t([[0.5, 1.0, 0.5]], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_crossget_ensemble_weights_keep_the_input_precision(dtype):
    """4 tokens [CLS, a, b, cross] with CLS and cross protected; a and b identical (cos 1), importance a = 0,
    b = ln 3: a is the source (lower importance - redundancy), b the destination, weights softmax(0, ln 3) =
    (1/4, 3/4); merged = (2 · 1/4 · x_a + 2 · 3/4 · x_b) / 2 = x_a / 4 + 3 x_b / 4 = (1/4)(4, 0) + (3/4)(0, 4) =
    (1, 3). In float64 the weights are float64 (98808e1: float32, off by ~1e-8)."""
    metric = t([[[1, 0], [0, 1], [0, 1], [1, 1]]], dtype)
    importance = t([[0, 0, math.log(3), 0]], dtype)
    protected = torch.tensor([[True, False, False, True]])
    merge, kept, _ = complete_graph_soft_matching(metric, importance, 1, protected=protected, num_protected=2)
    x = t([[[9, 9], [4, 0], [0, 4], [7, 7]]], dtype)
    out, size = merge(x)
    assert kept.tolist() == [[0, 2, 3]]
    torch.testing.assert_close(out[0, 1], t([1, 3], dtype), atol=1e-15 if dtype == torch.float64 else 1e-6, rtol=0)
    assert size[0, :, 0].tolist() == [1, 2, 1]
