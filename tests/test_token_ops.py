"""Tests for the ToMe token merging kernels in `vlmcompress.modeling.token_ops`.

The kernels are checked against a slow loop implementation written directly from the algorithm description, on
hand-checkable cases, and on invariants (sizes add up, protected tokens are never touched, the 50% clamp).
"""

import math

import pytest
import torch

from vlmcompress.modeling.tome import bipartite_soft_matching
from vlmcompress.modeling.token_ops import (
    do_nothing,
    merge_source,
    merge_wavg,
    parse_r,
    token_schedule,
)


def reference_merge(x, size, metric, r, class_token, distill_token):
    """Loop implementation of bipartite soft matching + size-weighted average merge.

    Returns the merged tokens `[B, N', D]`, their sizes `[B, N', 1]` and, per batch element, the output row that each
    original token ends up in.
    """
    batch_size, num_tokens, _ = metric.shape
    r = min(r, (num_tokens - int(class_token) - int(distill_token)) // 2)
    if r <= 0:
        return x.clone(), size.clone(), [list(range(num_tokens)) for _ in range(batch_size)]

    a_pos = list(range(0, num_tokens, 2))
    b_pos = list(range(1, num_tokens, 2))
    outs, out_sizes, assignments = [], [], []
    for b in range(batch_size):
        unit = [metric[b, t] / metric[b, t].norm() for t in range(num_tokens)]

        # For every A token: its best B partner and the similarity of that link.
        links = []
        for i, p in enumerate(a_pos):
            if class_token and i == 0:
                links.append((-math.inf, i, None))
                continue
            best_score, best_j = -math.inf, None
            for j, q in enumerate(b_pos):
                if distill_token and j == 0:
                    continue
                score = float(torch.dot(unit[p], unit[q]))
                if score > best_score:
                    best_score, best_j = score, j
            links.append((best_score, i, best_j))

        ranked = sorted(links, key=lambda link: -link[0])
        merged, kept = ranked[:r], ranked[r:]
        kept_a = [i for _, i, _ in kept]
        if class_token:
            kept_a.sort()

        totals = [x[b, q] * size[b, q] for q in b_pos]
        weights = [size[b, q].clone() for q in b_pos]
        for _, i, j in merged:
            totals[j] = totals[j] + x[b, a_pos[i]] * size[b, a_pos[i]]
            weights[j] = weights[j] + size[b, a_pos[i]]

        rows = [x[b, a_pos[i]] for i in kept_a] + [t / w for t, w in zip(totals, weights)]
        row_sizes = [size[b, a_pos[i]] for i in kept_a] + weights
        outs.append(torch.stack(rows))
        out_sizes.append(torch.stack(row_sizes))

        assignment = [None] * num_tokens
        for k, i in enumerate(kept_a):
            assignment[a_pos[i]] = k
        for j, q in enumerate(b_pos):
            assignment[q] = len(kept_a) + j
        for _, i, j in merged:
            assignment[a_pos[i]] = len(kept_a) + j
        assignments.append(assignment)

    return torch.stack(outs), torch.stack(out_sizes), assignments


CASES = [
    # (batch_size, num_tokens, dim, r, class_token, distill_token)
    (2, 9, 8, 3, True, False),
    (3, 16, 5, 5, True, False),
    (2, 17, 4, 8, False, False),
    (2, 12, 6, 4, True, True),
    (1, 10, 3, 100, True, False),  # clamped to 4
    (2, 8, 4, 2, False, True),
    (2, 3, 4, 1, True, True),  # clamped to 0
    (4, 33, 7, 16, True, False),
]


@pytest.mark.parametrize("batch_size,num_tokens,dim,r,class_token,distill_token", CASES)
def test_matches_loop_reference(batch_size, num_tokens, dim, r, class_token, distill_token):
    gen = torch.Generator().manual_seed(1000 * num_tokens + r)
    x = torch.randn(batch_size, num_tokens, dim, generator=gen, dtype=torch.float64)
    metric = torch.randn(batch_size, num_tokens, dim + 2, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 5, (batch_size, num_tokens, 1), generator=gen).to(torch.float64)

    expected_x, expected_size, assignments = reference_merge(x, size, metric, r, class_token, distill_token)
    merge, unmerge = bipartite_soft_matching(metric, r, class_token=class_token, distill_token=distill_token)
    merged_x, merged_size = merge_wavg(merge, x, size)

    assert merged_x.shape == expected_x.shape
    torch.testing.assert_close(merged_x, expected_x)
    torch.testing.assert_close(merged_size, expected_size)

    # Unweighted "mean" mode equals the weighted average with unit sizes.
    ones = torch.ones_like(size)
    expected_mean, _, _ = reference_merge(x, ones, metric, r, class_token, distill_token)
    torch.testing.assert_close(merge(x, mode="mean"), expected_mean)

    # unmerge gives every original token the row it ended up in.
    restored = unmerge(merged_x)
    assert restored.shape == x.shape
    for b, assignment in enumerate(assignments):
        torch.testing.assert_close(restored[b], merged_x[b, assignment])

    # merge_source marks exactly the original tokens that each output row holds.
    source = merge_source(merge, x)
    for b, assignment in enumerate(assignments):
        expected_source = torch.zeros(merged_x.shape[1], num_tokens, dtype=x.dtype)
        expected_source[assignment, list(range(num_tokens))] = 1.0
        torch.testing.assert_close(source[b], expected_source)


def hand_case_metric():
    # Tokens 2 (A-index 1) and 3 (B-index 1) are nearly parallel; every other pair is orthogonal.
    metric = torch.zeros(1, 5, 5)
    for t in (0, 1, 2, 4):
        metric[0, t, t] = 1.0
    metric[0, 3, 2] = 1.0
    metric[0, 3, 3] = 0.01
    return metric


def test_hand_case_merges_the_similar_pair_with_size_weights():
    metric = hand_case_metric()
    x = torch.tensor([[[0.0, 1.0], [10.0, 11.0], [20.0, 21.0], [40.0, 45.0], [60.0, 61.0]]])
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [1.0]]])

    merge, _ = bipartite_soft_matching(metric, r=1, class_token=True)
    merged_x, merged_size = merge_wavg(merge, x, size)

    # [CLS, unmerged A token 4, B token 1, B token 3 holding token 2]
    merged_row = [0.75 * 20 + 0.25 * 40, 0.75 * 21 + 0.25 * 45]
    expected_x = torch.tensor([[[0.0, 1.0], [60.0, 61.0], [10.0, 11.0], merged_row]])
    torch.testing.assert_close(merged_x, expected_x)
    assert merged_size.flatten().tolist() == [1.0, 1.0, 1.0, 4.0]

    # Without sizes the merged token is the plain average.
    merged_x, merged_size = merge_wavg(merge, x)
    torch.testing.assert_close(merged_x[0, 3], torch.tensor([30.0, 33.0]))
    assert merged_size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0]

    source = merge_source(merge, x)
    assert source[0].tolist() == [
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 1.0],
        [0.0, 1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 1.0, 0.0],
    ]


def test_hand_case_unmerge_copies_destination_back_to_source():
    merge, unmerge = bipartite_soft_matching(hand_case_metric(), r=1, class_token=True)
    x = torch.arange(10.0).reshape(1, 5, 2)
    merged = merge(x, mode="mean")
    restored = unmerge(merged)
    assert restored.shape == (1, 5, 2)
    merged_row = (x[0, 2] + x[0, 3]) / 2
    expected = torch.stack([x[0, 0], x[0, 1], merged_row, merged_row, x[0, 4]])
    torch.testing.assert_close(restored[0], expected)


def test_r_zero_is_exact_identity():
    x = torch.randn(2, 7, 4)
    merge, unmerge = bipartite_soft_matching(x, r=0)
    assert merge is do_nothing and unmerge is do_nothing
    assert merge(x, mode="sum") is x
    merged_x, merged_size = merge_wavg(merge, x)
    assert torch.equal(merged_x, x)
    assert torch.equal(merged_size, torch.ones(2, 7, 1))


@pytest.mark.parametrize(
    "num_tokens,class_token,distill_token",
    [(0, False, False), (1, True, False), (1, False, False), (2, True, False), (3, True, True)],
)
def test_tiny_inputs_do_nothing(num_tokens, class_token, distill_token):
    metric = torch.randn(2, num_tokens, 4)
    merge, unmerge = bipartite_soft_matching(metric, r=5, class_token=class_token, distill_token=distill_token)
    assert merge is do_nothing and unmerge is do_nothing


def test_two_tokens_without_class_token_merge_into_one():
    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])
    merge, _ = bipartite_soft_matching(x, r=5, class_token=False)
    merged_x, merged_size = merge_wavg(merge, x)
    torch.testing.assert_close(merged_x, torch.tensor([[[2.0, 4.0]]]))
    assert merged_size.flatten().tolist() == [2.0]


@pytest.mark.parametrize("class_token", [True, False])
def test_merging_identical_tokens_is_lossless(class_token):
    vector = torch.tensor([0.5, -1.0, 2.0, 3.0])
    x = vector.expand(3, 13, 4).clone()
    size = None
    for _ in range(3):
        merge, _ = bipartite_soft_matching(x, r=4, class_token=class_token)
        x, size = merge_wavg(merge, x, size)
    # 13 -> 9 -> 5 -> 3 (with a class token the last step is clamped to (5 - 1) // 2 = 2; without, to 5 // 2 = 2).
    assert x.shape == (3, 3, 4)
    torch.testing.assert_close(x, vector.expand_as(x))
    assert torch.equal(size.sum(dim=1), torch.full((3, 1), 13.0))


def test_sizes_and_sources_stay_consistent_over_layers():
    gen = torch.Generator().manual_seed(0)
    batch_size, num_tokens = 3, 50
    x = torch.randn(batch_size, num_tokens, 8, generator=gen)
    size = torch.randint(1, 4, (batch_size, num_tokens, 1), generator=gen).float()
    total = size.sum(dim=1)
    source = None
    for r in [10, 8, 6, 4]:
        merge, _ = bipartite_soft_matching(x + 0.1 * torch.randn(x.shape, generator=gen), r, class_token=True)
        source = merge_source(merge, x, source)
        x, size = merge_wavg(merge, x, size)
        torch.testing.assert_close(size.sum(dim=1), total)
    assert x.shape[1] == num_tokens - 28
    # Every original patch is held by exactly one token.
    assert torch.equal(source.sum(dim=1), torch.ones(batch_size, num_tokens))


def test_source_rows_sum_to_size_from_unit_start():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 21, 6, generator=gen)
    size, source = None, None
    for r in [5, 5, 5]:
        merge, _ = bipartite_soft_matching(x, r, class_token=True)
        source = merge_source(merge, x, source)
        x, size = merge_wavg(merge, x, size)
    assert x.shape == (2, 21 - 15, 6)
    torch.testing.assert_close(source.sum(dim=-1, keepdim=True), size)


def test_class_token_untouched_even_when_it_matches_everything():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 4, generator=gen)
    metric = x.clone()
    metric[:, 0] = metric[:, 1]  # CLS would be the best possible source if it were not protected
    merge, _ = bipartite_soft_matching(metric, r=5, class_token=True)
    merged_x, merged_size = merge_wavg(merge, x)
    assert torch.equal(merged_x[:, 0], x[:, 0])
    assert torch.equal(merged_size[:, 0], torch.ones(2, 1))

    # Control: unprotected, that token does get merged away.
    merge, _ = bipartite_soft_matching(metric, r=5, class_token=False)
    source = merge_source(merge, x)
    holder = source[:, :, 0].argmax(dim=1)
    assert all(source[b, holder[b]].sum() > 1 for b in range(2))


@pytest.mark.parametrize("distill_token", [True, False])
def test_distill_token_is_never_a_destination(distill_token):
    gen = torch.Generator().manual_seed(3)
    metric = torch.randn(2, 8, 6, generator=gen)
    metric[:, [2, 4, 6]] = metric[:, 1:2]  # every A token would pick the distillation token
    merge, _ = bipartite_soft_matching(metric, r=3, class_token=True, distill_token=distill_token)
    x = torch.randn(2, 8, 3, generator=gen)
    merged_x, merged_size = merge_wavg(merge, x)
    source = merge_source(merge, x)
    holder = source[:, :, 1].argmax(dim=1)
    holder_sizes = merged_size[torch.arange(2), holder, 0]
    if distill_token:
        # 4 A tokens, 3 merged -> CLS is the only unmerged A token, the distillation token (B-index 0) comes next.
        assert holder.tolist() == [1, 1]
        assert torch.equal(merged_x[:, 1], x[:, 1])
        assert holder_sizes.tolist() == [1.0, 1.0]
    else:
        assert holder_sizes.tolist() == [4.0, 4.0]


@pytest.mark.parametrize(
    "num_tokens,class_token,distill_token,expected",
    [(11, True, False, 6), (10, True, False, 6), (10, False, False, 5), (11, False, False, 6), (11, True, True, 7)],
)
def test_fifty_percent_clamp(num_tokens, class_token, distill_token, expected):
    x = torch.randn(2, num_tokens, 4)
    merge, _ = bipartite_soft_matching(x, r=100, class_token=class_token, distill_token=distill_token)
    merged_x, merged_size = merge_wavg(merge, x)
    assert merged_x.shape == (2, expected, 4)
    assert torch.equal(merged_size.sum(dim=1), torch.full((2, 1), float(num_tokens)))
    num_protected = int(class_token) + int(distill_token)
    assert token_schedule(num_tokens, [100], num_protected)[1] == [expected]


def test_token_schedule_predicts_kernel_token_counts():
    gen = torch.Generator().manual_seed(4)
    schedule = parse_r(6, (9, -0.5))
    x = torch.randn(1, 65, 4, generator=gen)
    observed = []
    for r in schedule:
        merge, _ = bipartite_soft_matching(x, r, class_token=True)
        x, _ = merge_wavg(merge, x)
        observed.append(x.shape[1])
    _, predicted = token_schedule(65, schedule, num_protected=1)
    assert observed == predicted


def test_unmerge_restores_shape_and_unmerged_tokens():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 24, 5, generator=gen)
    merge, unmerge = bipartite_soft_matching(x, r=7, class_token=True)
    merged = merge(x, mode="mean")
    assert merged.shape == (3, 17, 5)
    restored = unmerge(merged)
    assert restored.shape == x.shape
    source = merge_source(merge, x)  # (3, 17, 24)
    holder = source.argmax(dim=1)  # output row of each original token, (3, 24)
    untouched = source.sum(dim=-1).gather(1, holder) == 1  # original tokens that sit alone in their row
    # 7 sources and at most 7 distinct destinations take part in merges.
    assert 3 * (24 - 2 * 7) <= untouched.sum() <= 3 * (24 - 7 - 1)
    assert torch.equal(restored[untouched], x[untouched])
    for b, t in (~untouched).nonzero().tolist():
        assert not torch.allclose(restored[b, t], x[b, t])


def test_gradient_flows_to_x_not_metric():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    metric = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    merge, _ = bipartite_soft_matching(metric, r=3)
    merged_x, _ = merge_wavg(merge, x)
    merged_x.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert metric.grad is None
    size = torch.randint(1, 4, (2, 9, 1), generator=gen).to(torch.float64)
    assert torch.autograd.gradcheck(lambda t: merge_wavg(merge, t, size)[0], (x.detach().requires_grad_(),))


def test_metric_can_be_the_merged_tensor_itself():
    x = torch.randn(2, 9, 4, requires_grad=True)
    merge, _ = bipartite_soft_matching(x, r=3)
    merged_x, _ = merge_wavg(merge, x)
    merged_x.sum().backward()
    # Each output row averages the k tokens it holds, so d(sum)/dx is 1/k for each of them; a gradient leaking through
    # the matching (which reads x as metric) would add to this.
    source = merge_source(merge, x.detach())
    group_size = source.sum(dim=-1).gather(1, source.argmax(dim=1))  # (2, 9): size of each token's output row
    torch.testing.assert_close(x.grad, (1.0 / group_size)[..., None].expand_as(x))
    assert (group_size > 1).any()


def test_zero_metric_rows_are_dissimilar_not_nan():
    gen = torch.Generator().manual_seed(7)
    metric = torch.rand(2, 9, 4, generator=gen)  # positive entries: every pair of non-zero rows has cosine > 0
    metric[:, 3] = 0.0  # a B token; 0 / 0 would make its column NaN and pull every A token into it
    metric[:, 4] = 0.0  # an A token
    x = torch.randn(2, 9, 4, generator=gen)
    merge, unmerge = bipartite_soft_matching(metric, r=3)
    merged_x, merged_size = merge_wavg(merge, x)
    assert torch.isfinite(merged_x).all() and torch.isfinite(unmerge(merged_x)).all()
    assert merged_size.sum(dim=1).flatten().tolist() == [9.0, 9.0]
    source = merge_source(merge, x)
    holder = source[:, :, 3].argmax(dim=1)
    assert merged_size[torch.arange(2), holder, 0].tolist() == [1.0, 1.0]


def test_bfloat16_inputs():
    x = torch.randn(2, 17, 8, dtype=torch.bfloat16)
    merge, unmerge = bipartite_soft_matching(x, r=8)
    merged_x, merged_size = merge_wavg(merge, x)
    assert merged_x.dtype == torch.bfloat16 and merged_x.shape == (2, 9, 8)
    assert merged_size.sum(dim=1).flatten().tolist() == [17.0, 17.0]
    assert unmerge(merged_x).shape == x.shape


# ---------------------------------------------------------------------------------------------------------------------
# parse_r / token_schedule


def test_parse_r_int():
    assert parse_r(3, 4) == [4, 4, 4]
    assert parse_r(2, 0) == [0, 0]


def test_parse_r_ramp():
    # r=4, inflect=-0.5: from int(4 * 1.5) = 6 down to 2 * 4 - 6 = 2 in steps of -1.
    assert parse_r(5, (4, -0.5)) == [6, 5, 4, 3, 2]
    assert sum(parse_r(5, (4, -0.5))) == 5 * 4
    # r=8, inflect=-0.5: 12, 12 - 8/3, 12 - 16/3, 4 -> truncated; the total falls short by the rounding only.
    assert parse_r(4, (8, -0.5)) == [12, 9, 6, 4]
    schedule = parse_r(12, (16, -0.5))
    assert all(a >= b for a, b in zip(schedule, schedule[1:])) and schedule[0] > schedule[-1]
    assert 12 * 16 - 12 < sum(schedule) <= 12 * 16
    # inflect > 0 ramps up, inflect = 0 is constant; a 2-element list with a float second element is a ramp too.
    assert parse_r(3, (8, 0.5)) == [4, 8, 12]
    assert parse_r(3, [8, 0.5]) == [4, 8, 12]
    assert parse_r(4, (8, 0.0)) == [8, 8, 8, 8]
    assert parse_r(1, (8, -0.5)) == [8]


def test_parse_r_list():
    assert parse_r(4, [3, 2]) == [3, 2, 0, 0]
    assert parse_r(2, [8, 4]) == [8, 4]  # 2 ints: per layer, not a ramp
    assert parse_r(3, []) == [0, 0, 0]


@pytest.mark.parametrize("r", [-1, [1, -1], (-4, 0.5), (4, -2.0), (4, 1.5)])
def test_parse_r_rejects_negative(r):
    with pytest.raises(ValueError, match="0"):
        parse_r(3, r)


def test_parse_r_rejects_too_long_and_bad_types():
    with pytest.raises(ValueError, match="3 values but the model has 2 layers"):
        parse_r(2, [1, 2, 3])
    with pytest.raises(TypeError):
        parse_r(3, 2.5)
    with pytest.raises(TypeError):
        parse_r(3, [1, 2.0, 3])
    with pytest.raises(ValueError):
        parse_r(-1, 2)


def test_token_schedule_vit_b16():
    effective, remaining = token_schedule(197, [16] * 12)
    assert remaining == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    # 21 tokens left before the last layer: (21 - 1) // 2 = 10 < 16, so the bound clamps there.
    assert effective == [16] * 11 + [10]


def test_token_schedule_clamp():
    assert token_schedule(10, [8, 8, 8], num_protected=1) == ([4, 2, 1], [6, 4, 3])
    assert token_schedule(10, [8, 8, 8], num_protected=0) == ([5, 2, 1], [5, 3, 2])
    assert token_schedule(3, [1, 0, 2], num_protected=2) == ([0, 0, 0], [3, 3, 3])
    assert token_schedule(5, [], num_protected=1) == ([], [])
