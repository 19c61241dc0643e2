"""FastV, VisionZip and PruMerge for LLaVA-style models.

Kernels (`vlmcompress.modeling.token_ops`) against slow loop implementations written from the algorithm descriptions
(methods.md §8), on hand-checkable cases and random ones, plus invariants.
"""

import math

import numpy as np
import pytest
import torch
from helpers import layer_tokens

from vlmcompress.modeling.fastv import fastv_keep_index, last_token_attention
from vlmcompress.modeling.prumerge import iqr_outlier_count, prumerge_keep_index, prumerge_merge
from vlmcompress.modeling.visionzip import visionzip_merge

# ----------------------------------------------------------------------------------------------------------------
# loop references


def ref_last_token_attention(query, keys, valid, scale):
    b_size, heads, _ = query.shape
    groups = heads // keys.shape[1]
    out = torch.zeros(b_size, keys.shape[2])
    for b in range(b_size):
        for h in range(heads):
            logits = [float(query[b, h] @ keys[b, h // groups, j]) * scale if valid[b, j] else -math.inf
                      for j in range(keys.shape[2])]
            top = max(logits)
            e = [math.exp(v - top) if v != -math.inf else 0.0 for v in logits]
            out[b] += torch.tensor(e) / sum(e) / heads
    return out


def ref_fastv(scores, image_mask, num_keep):
    rows = []
    for b in range(scores.shape[0]):
        image = [j for j in range(scores.shape[1]) if image_mask[b, j]]
        ranked = sorted(image, key=lambda j: (-float(scores[b, j]), j))
        kept = set(ranked[:num_keep]) | {j for j in range(scores.shape[1]) if not image_mask[b, j]}
        rows.append(sorted(kept))
    return torch.tensor(rows)


def ref_visionzip(x, attn, metric, dominant, contextual, average_anchor=False):
    """`dominant` patches besides CLS; a contextual token is its anchor plus the mean of the patches that joined it
    (the paper's code), or the mean of the anchor and them (`average_anchor`, variant 1)."""
    out = []
    for b in range(x.shape[0]):
        patches = list(range(1, x.shape[1]))
        ranked = sorted(patches, key=lambda j: (-float(attn[b, j]), j))
        dom = sorted(ranked[:dominant])
        rest = sorted(ranked[dominant:])
        anchors = rest[::max(1, len(rest) // contextual)][:contextual] if contextual else []
        groups = {a: [a] for a in anchors}
        for j in rest:
            if j in groups:
                continue
            sims = [float(torch.nn.functional.cosine_similarity(metric[b, j], metric[b, a], dim=0)) for a in anchors]
            groups[anchors[sims.index(max(sims))]].append(j)
        def contextual_token(a):
            joined = [x[b, j] for j in groups[a][1:]]
            if average_anchor:
                return torch.stack([x[b, a], *joined]).mean(0)
            return x[b, a] + (torch.stack(joined).mean(0) if joined else 0)

        tokens = [x[b, 0]] + [x[b, j] for j in dom] + [contextual_token(a) for a in anchors]
        out.append(torch.stack(tokens))
    return torch.stack(out)


def ref_prumerge(x, attn, keys, keep, neighbours, extra_token):
    out = []
    for b in range(x.shape[0]):
        patches = list(range(1, x.shape[1]))
        kept = [int(i) + 1 for i in keep[b]]
        tokens = [x[b, 0]]
        for i in kept:
            sims = {j: float(torch.nn.functional.cosine_similarity(keys[b, i], keys[b, j], dim=0))
                    for j in patches if j != i}
            near = sorted(sims, key=lambda j: -sims[j])[:neighbours]
            tokens.append(x[b, i] + sum(attn[b, j] * x[b, j] for j in near))
        if extra_token:
            tokens.append(sum(attn[b, j] * x[b, j] for j in patches if j not in kept))
        out.append(torch.stack(tokens))
    return torch.stack(out)


def ref_prumerge_keep(attn, num_outliers, num_total):
    rows = []
    p = attn.shape[1]
    for b in range(attn.shape[0]):
        ranked = sorted(range(p), key=lambda j: (-float(attn[b, j]), j))
        outliers = ranked[:num_outliers]
        grid = set(range(0, p, max(1, p // (num_total - num_outliers)))) if num_total > num_outliers else set()
        tier = {j: 2 if j in outliers else 1 if j in grid else 0 for j in range(p)}
        order = sorted(range(p), key=lambda j: (-tier[j], -float(attn[b, j]), j))
        rows.append(sorted(order[:num_total]))
    return torch.tensor(rows)


# ----------------------------------------------------------------------------------------------------------------
# kernels


def test_last_token_attention_matches_loop_with_gqa_and_padding():
    g = torch.Generator().manual_seed(0)
    query, keys = torch.randn(3, 4, 8, generator=g), torch.randn(3, 2, 7, 8, generator=g)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[1, :2] = False  # left padding
    valid[2, :5] = False
    got = last_token_attention(query, keys, valid, 8 ** -0.5)
    torch.testing.assert_close(got, ref_last_token_attention(query, keys, valid, 8 ** -0.5), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(3))
    assert (got[~valid] == 0).all()


def test_fastv_keep_index_hand_case():
    # [text, img, img, img, img, text]: the two most attended images (positions 3 and 1) survive; ties go early
    scores = torch.tensor([[0.1, 0.3, 0.05, 0.4, 0.05, 0.1],
                           [0.1, 0.2, 0.20, 0.2, 0.10, 0.2]])
    image = torch.tensor([[0, 1, 1, 1, 1, 0]] * 2, dtype=torch.bool)
    assert fastv_keep_index(scores, image, 2).tolist() == [[0, 1, 3, 5], [0, 1, 2, 5]]
    assert fastv_keep_index(scores, image, 4).tolist() == [list(range(6))] * 2  # nothing to drop
    assert fastv_keep_index(scores, image, 0).tolist() == [[0, 5]] * 2


def test_fastv_keep_index_random_against_loop_and_invariants():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        b, length, n_img = 4, 30, 12
        image = torch.zeros(b, length, dtype=torch.bool)
        for row in range(b):  # image runs at different offsets (left padding shifts them)
            start = int(torch.randint(0, length - n_img, (1,), generator=g))
            image[row, start:start + n_img] = True
        scores = torch.rand(b, length, generator=g).round(decimals=1)  # many ties
        keep = int(torch.randint(0, n_img + 1, (1,), generator=g))
        got = fastv_keep_index(scores, image, keep)
        assert torch.equal(got, ref_fastv(scores, image, keep)), trial
        assert got.shape == (b, length - n_img + keep)
        assert (got.diff(dim=1) > 0).all()  # original order
        assert (image.gather(1, got).sum(1) == keep).all()


def test_fastv_keep_index_rejects_ragged_image_counts():
    image = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="same number of image tokens"):
        fastv_keep_index(torch.rand(2, 4), image, 1)


def test_visionzip_hand_case():
    # CLS + 6 patches with scalar features; attention picks patches 2 and 5 as dominant
    x = torch.tensor([[[100.], [1.], [2.], [3.], [4.], [5.], [6.]]])
    attn = torch.tensor([[0.0, 0.1, 0.3, 0.05, 0.05, 0.4, 0.1]])
    # remaining patches 1, 3, 4, 6; anchors at stride 4 // 2 = 2: patches 1 and 4; 3 is close to 1, 6 to 4
    metric = torch.tensor([[[0., 1.], [1., 0.], [0., 1.], [1., 0.1], [0.1, 1.], [0., 1.], [0.2, 1.]]])
    got = visionzip_merge(x, attn, metric, dominant_patches=2, contextual=2)
    assert got[0, :, 0].tolist() == [100., 2., 5., 1. + 3., 4. + 6.]
    got = visionzip_merge(x, attn, metric, dominant_patches=2, contextual=2, average_anchor=True)  # variant 1
    assert got[0, :, 0].tolist() == [100., 2., 5., (1. + 3.) / 2, (4. + 6.) / 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_visionzip_random_against_loop_and_invariants(dtype):
    g = torch.Generator().manual_seed(2)
    x, metric = torch.randn(3, 17, 5, generator=g, dtype=dtype), torch.randn(3, 17, 4, generator=g, dtype=dtype)
    attn = torch.rand(3, 17, generator=g, dtype=dtype).softmax(-1)
    for dominant, contextual in [(4, 3), (10, 6), (0, 5), (16, 0), (3, 13)]:
        for average_anchor in (False, True):
            got = visionzip_merge(x, attn, metric, dominant, contextual, average_anchor=average_anchor)
            assert got.shape == (3, 1 + dominant + contextual, 5) and got.dtype == dtype
            torch.testing.assert_close(got, ref_visionzip(x, attn, metric, dominant, contextual, average_anchor))
            assert torch.equal(got[:, 0], x[:, 0])  # CLS untouched
    # every patch kept as dominant: the identity (same tokens, same order)
    assert torch.equal(visionzip_merge(x, attn, metric, 16, 0), x)
    # merging identical tokens: the mean (variant 1) is lossless, the paper's anchor + mean doubles them
    same = x[:, :1].expand(3, 17, 5).clone()
    torch.testing.assert_close(visionzip_merge(same, attn, metric, 4, 3, average_anchor=True), same[:, :8])
    paper = visionzip_merge(same, attn, metric, 4, 3)
    torch.testing.assert_close(paper[:, 5:], 2 * same[:, 5:8])


def test_iqr_outlier_count_against_numpy():
    g = torch.Generator().manual_seed(3)
    values = torch.rand(4, 50, generator=g) ** 6  # a heavy right tail
    flat = values.flatten().numpy()
    q1, q3 = np.percentile(flat, [25, 75])
    expected = int((flat > q3 + 1.5 * (q3 - q1)).sum()) // 4
    assert expected > 1
    assert iqr_outlier_count(values) == expected
    assert iqr_outlier_count(torch.full((2, 10), 0.1)) == 1  # no outlier: at least one token stays


def test_prumerge_keep_index_against_loop():
    g = torch.Generator().manual_seed(4)
    attn = torch.rand(3, 20, generator=g).round(decimals=1)
    for outliers, total in [(3, 3), (3, 8), (0, 5), (5, 20), (2, 12)]:
        got = prumerge_keep_index(attn, outliers, total)
        assert torch.equal(got, ref_prumerge_keep(attn, outliers, total)), (outliers, total)
    hand = torch.tensor([[0.1, 0.5, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0]])
    assert prumerge_keep_index(hand, 2).tolist() == [[1, 3]]
    # PruMerge+: 2 outliers + stride 8 // 2 = 4 points (0 and 4)
    assert prumerge_keep_index(hand, 2, 4).tolist() == [[0, 1, 3, 4]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prumerge_merge_hand_case_and_against_loop(dtype):
    # CLS + 4 patches; keep patch 1 (index 0); its single nearest neighbour by key is patch 3 (index 2)
    x = torch.tensor([[[9.], [1.], [2.], [4.], [8.]]])
    attn = torch.tensor([[0.0, 0.4, 0.1, 0.3, 0.2]])
    keys = torch.tensor([[[0., 0.], [1., 0.], [0., 1.], [1., 0.1], [-1., 0.]]])
    got = prumerge_merge(x, attn, keys, torch.tensor([[0]]), neighbours=1, extra_token=True)
    assert got[0, :, 0].tolist() == pytest.approx([9., 1. + 0.3 * 4., 0.1 * 2. + 0.3 * 4. + 0.2 * 8.])

    g = torch.Generator().manual_seed(5)
    x, keys = torch.randn(2, 13, 6, generator=g, dtype=dtype), torch.randn(2, 13, 3, generator=g, dtype=dtype)
    attn = torch.rand(2, 13, generator=g, dtype=dtype).softmax(-1)
    keep = prumerge_keep_index(attn[:, 1:], 4)
    for neighbours, extra in [(3, True), (32, False), (0, True)]:
        got = prumerge_merge(x, attn, keys, keep, neighbours, extra)
        assert got.shape == (2, 1 + 4 + extra, 6) and got.dtype == dtype
        torch.testing.assert_close(got, ref_prumerge(x, attn, keys, keep, neighbours, extra))
        assert torch.equal(got[:, 0], x[:, 0])
    # no neighbours: the kept patches are the inputs themselves
    assert torch.equal(prumerge_merge(x, attn, keys, keep, 0, False)[:, 1:], x[:, 1:].gather(
        1, keep[..., None].expand(-1, -1, 6)))


# ----------------------------------------------------------------------------------------------------------------
# models: tiny-llava (2 vision layers, feature layer 0; 2-layer Llama with grouped-query attention)

FASTV = {"method": "token_reduce", "algorithm": "fastv", "layer": 1, "keep_ratio": 0.25}
VISIONZIP = {"method": "token_reduce", "algorithm": "visionzip", "keep_ratio": 0.5}
PRUMERGE_FIXED = {"method": "token_reduce", "algorithm": "prumerge", "keep_ratio": 0.3, "plus": True}
PRUMERGE_ADAPTIVE = {"method": "token_reduce", "algorithm": "prumerge"}
STAGES = {"fastv": FASTV, "visionzip": VISIONZIP, "prumerge_fixed": PRUMERGE_FIXED,
          "prumerge_adaptive": PRUMERGE_ADAPTIVE}
IMAGE_ID = 4
LLM_LAYERS = "model.language_model.layers"
VISION_LAYERS = "model.vision_tower.encoder.layers"


def tiny():
    from vlmcompress.adapters import BUILTIN_TINY

    return BUILTIN_TINY["tiny-llava"]


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """name → (output folder, in-memory model returned by apply)."""
    import vlmcompress

    out = {}
    for name, stage in STAGES.items():
        folder = tmp_path_factory.mktemp(name) / "out"
        out[name] = (folder, vlmcompress.apply({"model": "tiny-llava", "output": str(folder), "stages": [stage]},
                                               progress=False))
    return out


def padded_batch(seed=0):
    """Two prompts `[text, 64 image placeholders, text]` of different lengths, the shorter one left-padded, and the
    same prompts one by one without padding."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    rows = [torch.cat([torch.randint(5, 30, (3,), generator=g), torch.full((64,), IMAGE_ID),
                       torch.randint(5, 30, (n,), generator=g)]) for n in (6, 2)]
    length = max(len(r) for r in rows)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    singles = [{"input_ids": r[None], "attention_mask": torch.ones(1, len(r), dtype=torch.long),
                "pixel_values": pixels[i:i + 1]} for i, r in enumerate(rows)]
    return batch, singles


def test_fastv_scores_equal_eager_attention_of_layer_k():
    from vlmcompress.modeling.fastv import apply_fastv

    eager = tiny().tiny_model(0)
    eager.set_attn_implementation("eager")
    model = tiny().tiny_model(0)  # SDPA: FastV computes its one attention row itself
    state = apply_fastv(model, {"layers_path": LLM_LAYERS, "inputs_path": "model", "layer": 1, "keep_ratio": 0.5,
                                "image_token_id": IMAGE_ID})
    batch, _ = padded_batch()
    position_ids = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        attentions = eager(**batch, position_ids=position_ids, output_attentions=True).attentions
        model(**batch, position_ids=position_ids)
    expected = attentions[0][:, :, -1, :].float().mean(dim=1)  # layer K = 1 (index 0), last query, mean over heads
    torch.testing.assert_close(state.scores, expected, atol=1e-6, rtol=1e-4)
    assert (state.scores[batch["attention_mask"] == 0] == 0).all()
    image = batch["input_ids"] == IMAGE_ID
    kept_image = image.gather(1, state.keep)
    assert (kept_image.sum(1) == 32).all()
    # the kept image tokens are the most attended ones of each row
    for b in range(2):
        kept_scores = state.scores[b][state.keep[b][kept_image[b]]]
        dropped = image[b].clone()
        dropped[state.keep[b]] = False
        assert kept_scores.min() >= state.scores[b][dropped].max()


def test_fastv_identity_at_keep_ratio_one_and_changes_outputs_below():
    from vlmcompress.modeling.fastv import apply_fastv

    base = tiny().tiny_model(0)
    inputs = tiny().example_inputs(base, batch_size=2)
    with torch.no_grad():
        expected = base(**inputs).logits
    for ratio, same in ((1.0, True), (0.5, False)):
        model = tiny().tiny_model(0)
        apply_fastv(model, {"layers_path": LLM_LAYERS, "inputs_path": "model", "layer": 1, "keep_ratio": ratio,
                            "image_token_id": IMAGE_ID})
        with torch.no_grad():
            got = model(**inputs).logits
        diff = (got[:, -1] - expected[:, -1]).abs().max().item()
        assert (diff < 1e-5) if same else (diff > 1e-3), (ratio, diff)
        assert got.shape[1] == expected.shape[1] - (0 if same else 32)


def test_fastv_generate_equals_prefill_and_decode_by_hand(reduced):
    _, model = reduced["fastv"]
    batch, _ = padded_batch()
    steps = 6
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=steps, do_sample=False, eos_token_id=[])[:, -steps:]
        mask = batch["attention_mask"]
        position = (mask.cumsum(1) - 1).clamp_min(0)
        out = model(**batch, position_ids=position, use_cache=True)
        cache = out.past_key_values
        # the first decoder layer holds the whole prompt, the pruned layer 3/4 of the image tokens fewer
        assert cache.get_seq_length(0) - cache.get_seq_length(1) == 48
        token = out.logits[:, -1:].argmax(-1)
        tokens, pos = [token], position[:, -1:]
        for _ in range(steps - 1):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            pos = pos + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
    assert torch.equal(generated, torch.cat(tokens, dim=1))


@pytest.mark.parametrize("name", ["fastv", "visionzip", "prumerge_fixed", "prumerge_adaptive"])
def test_batched_left_padded_equals_each_sample_alone(reduced, name):
    _, model = reduced[name]
    batch, singles = padded_batch(seed=1)
    kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=[], output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        together = model.generate(**batch, **kwargs)
        for i, single in enumerate(singles):
            alone = model.generate(**single, **kwargs)
            assert torch.equal(together.sequences[i, -4:], alone.sequences[0, -4:]), (name, i)
            for step in range(4):
                torch.testing.assert_close(together.logits[step][i], alone.logits[step][0], atol=2e-5, rtol=1e-4)


def test_tokens_per_layer_follow_the_schedule(reduced):
    inputs = tiny().example_inputs(reduced["fastv"][1], batch_size=2)  # 64 image tokens + 6 text tokens
    _, fastv = reduced["fastv"]
    assert fastv.vlmcompress_report["tokens_per_layer"] == {"llm": [64, 16, 16]}
    assert layer_tokens(fastv, LLM_LAYERS, lambda: fastv(**inputs)) == [6 + 16, 6 + 16]
    assert fastv.model._vlmc_fastv.image_tokens == [16, 16]
    _, vz = reduced["visionzip"]
    # 50% of 64 patches = 32 image tokens: 27 dominant (CLS + 26 patches) + 5 contextual
    assert vz.vlmcompress_report["tokens_per_layer"] == {"vision": [65, 32, 32]}
    assert vz.config.token_reduction["options"] == {"layer": 0, "dominant": 27, "contextual": 5,
                                                    "keep_positions": False, "class_token_to_llm": True}
    assert vz.config.token_reduction["variant"] == 2
    assert layer_tokens(vz, VISION_LAYERS, lambda: vz(**inputs)) == [32, 32]
    assert layer_tokens(vz, LLM_LAYERS, lambda: vz(**inputs)) == [6 + 32, 6 + 32]  # CLS handed on, as the paper
    _, pm = reduced["prumerge_fixed"]
    # 30% of 64 patches = 19 tokens: 18 selected (5 outliers + stride points) + the extra token
    assert pm.config.token_reduction["options"] == {"layer": 0, "mode": "fixed", "neighbours": 32, "plus": True,
                                                    "extra_token": True, "selected": 18, "outliers": 5,
                                                    "keep_positions": False, "order": "attention",
                                                    "attention_layer": 1}
    assert layer_tokens(pm, VISION_LAYERS, lambda: pm(**inputs)) == [20, 20]


def paper_class_attention(model, pixels):
    """PruMerge's CLS attention as the paper's code computes it: hidden states of the feature layer (layer 0) fed
    to layer 1's `layer_norm1`, `q_proj`, `k_proj` (its forward hooks), one full-width softmax."""
    vision = model.model.vision_tower
    out = vision(pixel_values=pixels, output_hidden_states=True)
    h = out.hidden_states[1]
    after = vision.encoder.layers[1]
    q = after.self_attn.q_proj(after.layer_norm1(h))
    k = after.self_attn.k_proj(after.layer_norm1(h))
    attn = ((q @ k.transpose(-2, -1)) * h.shape[-1] ** -0.5).softmax(dim=-1)
    return h, attn[:, 0], k


def test_prumerge_adaptive_count_is_chosen_per_image_at_run_time(reduced):
    from vlmcompress.modeling.prumerge import adaptive_keep_count

    _, model = reduced["prumerge_adaptive"]
    block = model.config.token_reduction
    assert block["data_dependent"] is True and block["towers"][0]["data_dependent"] is True
    inputs = tiny().example_inputs(model, batch_size=2)
    with torch.no_grad():
        _, cls, _ = paper_class_attention(tiny().tiny_model(0), inputs["pixel_values"])
    counts = [adaptive_keep_count(cls[i, 1:])[0] for i in range(2)]
    assert all(0 <= c < 30 for c in counts) and max(counts) > 0, counts  # the paper's count may be 0
    with torch.no_grad():
        model(**inputs)
    state = model.model.vision_tower.encoder._vlmc_state
    rows = [1 + c + 1 for c in counts]  # CLS + kept patches + the extra token
    assert (state.row_tokens.tolist() if state.row_tokens is not None else [rows[0]] * 2) == rows
    tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(tokens[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])  # prompt as given


def test_prumerge_plus_adaptive_rows_of_different_lengths_equal_each_image_alone(tmp_path):
    """PruMerge+ adaptive adds each image's own stride points: rows keep different counts, the batch is padded,
    and every row computes what it computes alone (the paper's code is defined for one image)."""
    import vlmcompress

    model = vlmcompress.apply({"model": "tiny-llava", "output": str(tmp_path / "out"),
                               "stages": [PRUMERGE_ADAPTIVE | {"plus": True}]}, progress=False)
    g = torch.Generator().manual_seed(7)
    pixels = torch.randn(3, 3, 32, 32, generator=g) * torch.tensor([0.2, 1.0, 3.0])[:, None, None, None]
    ids = torch.cat([torch.tensor([[5, 6]]), torch.full((1, 64), IMAGE_ID), torch.tensor([[7, 8, 9]])], 1)
    batch = {"input_ids": ids.expand(3, -1), "attention_mask": torch.ones(3, ids.shape[1], dtype=torch.long),
             "pixel_values": pixels}
    with torch.no_grad():
        together = model(**batch).logits[:, -1]
        rows = model.model.vision_tower.encoder._vlmc_state.row_tokens
        assert rows is not None and len(set(rows.tolist())) > 1, rows  # different counts per image
        for i in range(3):
            alone = model(**{k: v[i:i + 1] for k, v in batch.items()}).logits[:, -1]
            torch.testing.assert_close(together[i:i + 1], alone, atol=2e-5, rtol=1e-4)


def test_fastv_labels_align_with_the_kept_positions(reduced):
    _, model = reduced["fastv"]
    inputs = tiny().example_inputs(model, batch_size=2)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_ID, -100)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    keep = model.model._vlmc_fastv.keep
    kept_labels = labels.gather(1, keep)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), kept_labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)


CHILD = """
import sys
sys.modules["vlmcompress"] = None  # the checkpoint must load with stock transformers and its own modeling files
import json
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

io_dir, folders = sys.argv[1], sys.argv[2:]
inputs = load_file(io_dir + "/inputs.safetensors")
for i, folder in enumerate(folders):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=[])[:, -4:]
    save_file({"logits": logits.contiguous(), "tokens": tokens.contiguous()}, f"{io_dir}/out{i}.safetensors")
"""


def main_outputs(model, inputs):
    with torch.no_grad():
        return {"logits": model(**inputs).logits[:, -1],
                "tokens": model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=[])[:, -4:]}


def test_checkpoints_reload_in_a_fresh_process_and_with_vlmcompress(reduced, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    import vlmcompress

    batch, _ = padded_batch(seed=2)
    save_file(batch, str(tmp_path / "inputs.safetensors"))
    names = list(STAGES)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), *(str(reduced[n][0]) for n in names)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = main_outputs(tiny().tiny_model(0), batch)
    for i, name in enumerate(names):
        folder, model = reduced[name]
        expected = main_outputs(model, batch)
        child = load_file(str(tmp_path / f"out{i}.safetensors"))
        loaded = main_outputs(vlmcompress.load(folder), batch)
        for got, how in ((child, "from_pretrained in a fresh process"), (loaded, "vlmcompress.load")):
            torch.testing.assert_close(got["logits"], expected["logits"], atol=1e-5, rtol=1e-5, msg=f"{name} {how}")
            assert torch.equal(got["tokens"], expected["tokens"]), (name, how)
        # the reduction is active: the outputs are not those of the unreduced model
        assert (expected["logits"] - base["logits"]).abs().max() > 1e-3, name


@pytest.mark.parametrize("stage, fragment", [
    ({"algorithm": "fastv", "layer": 2}, "between 1 and 1 for this 2-layer language model; got 2"),
    ({"algorithm": "fastv", "components": ["vision"]}, "use components: [llm]"),
    ({"algorithm": "visionzip", "dominant": 60, "contextual": 10}, "has 64 patches"),
    ({"algorithm": "prumerge", "components": ["llm"]}, "use components: [vision]"),
])
def test_bad_settings_are_one_line_errors(stage, fragment, tmp_path):
    from vlmcompress.errors import VlmCompressError
    import vlmcompress

    with pytest.raises(VlmCompressError, match=re_escape(fragment)):
        vlmcompress.apply({"model": "tiny-llava", "output": str(tmp_path / "out"),
                           "stages": [{"method": "token_reduce", **stage}]}, progress=False)


def re_escape(text):
    import re

    return re.escape(text)


@pytest.mark.parametrize("name", ["visionzip", "prumerge_fixed"])
def test_feature_layer_output_is_the_kernel_applied_to_the_stock_layer(reduced, name):
    """The reducer runs after the MLP of the feature layer, with that layer's CLS attention and keys."""
    _, model = reduced[name]
    stock = tiny().tiny_model(0)
    stock.set_attn_implementation("eager")
    pixels = tiny().example_inputs(stock, batch_size=2)["pixel_values"]
    with torch.no_grad():
        out = stock.model.vision_tower(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        layer = stock.model.vision_tower.encoder.layers[0]  # the feature layer (vision_feature_layer -2 of 2)
        b, n, _ = out.hidden_states[0].shape
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[0])).view(b, n, 4, -1)
        cls = out.attentions[0][:, :, 0, :].mean(dim=1)
        o = model.config.token_reduction["options"]
        if name == "visionzip":  # dominant counts CLS
            expected = visionzip_merge(out.hidden_states[1], cls, keys.mean(dim=2), o["dominant"] - 1,
                                       o["contextual"])
        else:  # the paper: CLS attention and keys of the layer after the feature layer, attention order
            h, cls, keys = paper_class_attention(stock, pixels)
            attn = cls[:, 1:]
            keep = prumerge_keep_index(attn, o["outliers"], o["selected"])
            a = attn.gather(1, keep)
            outlier_rank = a.argsort(dim=1, descending=True)[:, :o["outliers"]]
            order = []
            for row in range(b):  # outliers by descending attention, then the stride points in raster order
                top = keep[row, outlier_rank[row]].tolist()
                order.append(top + [p for p in keep[row].tolist() if p not in top])
            expected = prumerge_merge(h, cls, keys, torch.tensor(order), o["neighbours"], o["extra_token"])
        got = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model, stage, fragments", [
    ("tiny-clip", "algorithm: fastv", ["fastv works on LLaVA-style models", "clip"]),
    ("tiny-llava", "algorithm: fastv", ["layer", "between 1 and 1", "got 2"]),  # default K=2, 2 decoder layers
    ("tiny-llava", "algorithm: visionzip\n    keep_ratio: 1.5", ["keep_ratio", "less than or equal to 1"]),
    ("tiny-llava", "algorithm: prumerge\n    keep_ratio: 0", ["keep_ratio", "greater than 0"]),
    ("tiny-llava", "algorithm: fastv\n    r: 8", ["r does not apply to algorithm: fastv"]),
])
def test_cli_bad_input_is_one_line_and_exit_1(model, stage, fragments, tmp_path):
    from typer.testing import CliRunner

    from vlmcompress.cli import app

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model}\noutput: {tmp_path / 'out'}\nstages:\n  - method: token_reduce\n    {stage}\n")
    result = CliRunner().invoke(app, ["apply", str(recipe)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and all(line.startswith("error:") for line in lines) and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    assert not (tmp_path / "out").exists()


def test_fastv_prefill_equals_a_layer_by_layer_reference():
    """Layers after K run on the kept tokens at their original positions: rebuilt here by hand from stock modules
    (rotary embeddings recomputed for the kept position ids, the causal + padding mask rebuilt for the kept tokens)."""
    from vlmcompress.modeling.fastv import apply_fastv

    model = tiny().tiny_model(0)
    state = apply_fastv(model, {"layers_path": LLM_LAYERS, "inputs_path": "model", "layer": 1, "keep_ratio": 0.25,
                                "image_token_id": IMAGE_ID})
    batch, _ = padded_batch(seed=3)
    ids, pad = batch["input_ids"], batch["attention_mask"].bool()
    position = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(**batch, position_ids=position).logits
        keep = fastv_keep_index(state.scores, ids == IMAGE_ID, 16)
        assert torch.equal(keep, state.keep)
        # the reference: stock modules, one layer at a time
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        embeds = model.model.get_input_embeddings()(ids).masked_scatter((ids == IMAGE_ID)[..., None],
                                                                        torch.cat(list(features)))
        lm = model.model.language_model
        h, pos, valid = embeds, position, pad
        for i, layer in enumerate(lm.layers):
            if i == 1:  # K = 1: from here on, the kept tokens only
                h, pos, valid = h.gather(1, keep[..., None].expand(-1, -1, h.shape[-1])), pos.gather(1, keep), \
                    valid.gather(1, keep)
            n = h.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
            mask = mask | torch.eye(n, dtype=torch.bool)  # padded queries see themselves (their output is unused)
            h = type(layer).__mro__[1].forward(layer, h, attention_mask=mask, position_ids=pos,
                                               position_embeddings=lm.rotary_emb(h, pos))
        expected = model.lm_head(lm.norm(h))
    assert logits.shape == expected.shape == (2, ids.shape[1] - 48, 100)
    real = valid  # rows' padded positions differ in how they attend; compare real tokens only
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# keep_positions: the kept image tokens keep their original position ids


def test_kept_image_positions_with_two_images_per_row_and_adjacent_runs():
    from vlmcompress.modeling.llava_tokens import kept_image_positions

    p = 9  # placeholder id; runs of 4
    ids = torch.tensor([[0, 1, p, p, p, p, p, p, p, p, 2],
                        [1, p, p, p, p, 3, p, p, p, p, 2]])
    positions = torch.arange(11).expand(2, -1)
    offsets = torch.tensor([[0, 2], [1, 3], [0, 1], [2, 3]])  # images in row-major order of the runs
    kept, moved = kept_image_positions(ids, positions, p, 4, offsets)
    # each run keeps its first two placeholders, placed at the run start + the offsets
    assert torch.equal(kept, torch.tensor([[1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 1],
                                           [1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1]], dtype=torch.bool))
    assert moved[kept].view(2, -1).tolist() == [[0, 1, 2, 4, 7, 9, 10], [0, 1, 2, 5, 8, 9, 10]]
    # a class token handed on shares the first placeholder's position with patch 1: repeated positions
    kept, moved = kept_image_positions(ids[:1], positions[:1], p, 4, torch.tensor([[0, 0], [0, 3]]))
    assert moved[kept].tolist() == [0, 1, 2, 2, 6, 9, 10]
    # per-image counts: the second image keeps one token
    kept, moved = kept_image_positions(ids[:1], positions[:1], p, 4, offsets[:2], torch.tensor([2, 1]))
    assert moved[kept].tolist() == [0, 1, 2, 4, 7, 10]
    with pytest.raises(ValueError, match="2 images were encoded"):
        kept_image_positions(ids, positions, p, 4, offsets[:2])


def test_keep_positions_equals_masking_the_dropped_tokens_in_the_stock_model(tmp_path):
    """PruMerge without merging (no neighbours, no extra token) and with keep_positions keeps a subset of the image
    tokens at their places: the same as the unreduced model with the dropped placeholders masked out."""
    import vlmcompress

    stage = {"method": "token_reduce", "algorithm": "prumerge", "mode": "fixed", "keep_ratio": 0.25,
             "neighbours": 0, "extra_token": False, "keep_positions": True}
    model = vlmcompress.apply({"model": "tiny-llava", "output": str(tmp_path / "out"), "stages": [stage]},
                              progress=False)
    stock = tiny().tiny_model(0)
    batch, _ = padded_batch(seed=4)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        state = model.model.vision_tower.encoder._vlmc_state
        patches = state.source_index[:, 1:] - 1  # kept patches of each image (CLS dropped)
        assert patches.shape == (2, 16) and (patches.diff(dim=1) > 0).all()
        mask = batch["attention_mask"].clone()
        image = batch["input_ids"] == IMAGE_ID
        for b in range(2):
            dropped = torch.ones(64, dtype=torch.bool)
            dropped[patches[b]] = False
            mask[b, image[b].nonzero()[:, 0][dropped]] = 0
        positions = torch.arange(batch["input_ids"].shape[1]).expand(2, -1)
        expected = stock(**(batch | {"attention_mask": mask}), position_ids=positions).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    # without keep_positions the same tokens close their gaps, which changes the outputs
    closed = vlmcompress.apply({"model": "tiny-llava", "output": str(tmp_path / "closed"),
                                "stages": [stage | {"keep_positions": False}]}, progress=False)
    with torch.no_grad():
        assert (closed(**batch).logits[:, -1] - logits).abs().max() > 1e-4  # float noise is ~1e-7


@pytest.mark.parametrize("stage", [
    {"algorithm": "visionzip", "keep_ratio": 0.5, "keep_positions": True},
    {"algorithm": "prumerge", "keep_positions": True},
])
def test_keep_positions_batched_equals_alone_and_reloads(stage, tmp_path):
    import vlmcompress

    folder = tmp_path / "out"
    model = vlmcompress.apply({"model": "tiny-llava", "output": str(folder),
                               "stages": [{"method": "token_reduce", **stage}]}, progress=False)
    assert model.config.token_reduction["options"]["keep_positions"] is True
    batch, singles = padded_batch(seed=5)
    kwargs = dict(max_new_tokens=3, do_sample=False, eos_token_id=[], output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        together = model.generate(**batch, **kwargs)
        assert torch.equal(together.sequences[:, :batch["input_ids"].shape[1]], batch["input_ids"])
        for i, single in enumerate(singles):  # PruMerge's adaptive count is chosen per image
            alone = model.generate(**single, **kwargs)
            assert torch.equal(together.sequences[i, -3:], alone.sequences[0, -3:])
            torch.testing.assert_close(together.logits[0][i], alone.logits[0][0], atol=2e-5, rtol=1e-4)
        loaded = vlmcompress.load(folder)
        again = loaded.generate(**batch, **kwargs)
    assert torch.equal(again.sequences, together.sequences)
    torch.testing.assert_close(again.logits[0], together.logits[0])


def test_prumerge_plus_never_hands_more_tokens_than_placeholders(tmp_path, monkeypatch):
    """Many outliers make PruMerge+'s stride 1: outliers and stride points cover every patch, and with the extra
    token the paper's code would hand the language model one token more than the processor wrote placeholders. The
    kept patches are capped at P - 1, so the prompt still fits (this forward raised `Image features and image tokens
    do not match` before the cap)."""
    import vlmcompress
    from vlmcompress.modeling import prumerge

    model = vlmcompress.apply({"model": "tiny-llava", "output": str(tmp_path / "out"),
                               "stages": [PRUMERGE_ADAPTIVE | {"plus": True}]}, progress=False)
    monkeypatch.setattr(prumerge, "adaptive_keep_count", lambda values: (64, 1.0))  # every patch an outlier
    inputs = tiny().example_inputs(model, batch_size=2)
    with torch.no_grad():
        out = model(**inputs)
    assert layer_tokens(model, LLM_LAYERS, lambda: model(**inputs)) == [inputs["input_ids"].shape[1]] * 2
    assert out.logits.shape[1] == inputs["input_ids"].shape[1]  # 63 patches + the extra token = 64 placeholders
