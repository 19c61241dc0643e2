"""Turbo and CrossGET: kernels against loop references written from methods.md §3b / §5a, invariants, and the
`token_reduce` stage on the built-in families (schedule, save → fresh-process load, batch = per sample)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vlmcompress
from vlmcompress.adapters import BUILTIN_TINY
from vlmcompress.errors import VlmCompressError
from vlmcompress.modeling.crossget import complete_graph_soft_matching
from vlmcompress.modeling.token_ops import merge_wavg, r_for_keep_ratio, token_schedule
from vlmcompress.modeling.turbo import informativity_soft_matching, turbo_semantic_weight

# ----------------------------------------------------------------------------------------------------------------
# Turbo kernel


def turbo_reference(x, metric, cls_attention, r, weight, class_token):
    """Loop Turbo: A = even tokens, B = odd; an A token's score is its best cosine to B minus weight × its CLS
    attention; the r best-scoring A tokens merge into their best B token by size-weighted average."""
    n = x.shape[0]
    r = min(r, (n - int(class_token)) // 2)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    links = []
    for i, p in enumerate(a_pos):
        sims = [float(unit[p] @ unit[q]) for q in b_pos]
        best_j = max(range(len(b_pos)), key=lambda j: (sims[j], -j))
        score = -math.inf if (class_token and i == 0) else sims[best_j] - weight * float(cls_attention[p])
        links.append((score, i, best_j))
    ranked = sorted(links, key=lambda link: -link[0])
    merged, kept = ranked[:r], sorted(i for _, i, _ in ranked[r:])
    totals = [x[q].clone() for q in b_pos]
    sizes = [1.0 for _ in b_pos]
    for _, i, j in merged:
        totals[j] += x[a_pos[i]]
        sizes[j] += 1.0
    rows = [x[a_pos[i]] for i in kept] + [t / s for t, s in zip(totals, sizes)]
    return torch.stack(rows), torch.tensor([1.0] * len(kept) + sizes)


@pytest.mark.parametrize("n,r,weight,class_token", [(9, 3, 0.0, True), (16, 5, 2.0, True), (17, 8, 150.0, False),
                                                      (12, 4, 30.0, True)])
def test_turbo_matches_loop_reference(n, r, weight, class_token):
    gen = torch.Generator().manual_seed(n * 100 + r)
    x, metric = torch.randn(2, n, 6, generator=gen), torch.randn(2, n, 5, generator=gen)
    cls_attention = torch.rand(2, n, generator=gen).softmax(-1)
    merge, _ = informativity_soft_matching(metric, cls_attention, r, weight, class_token)
    got, size = merge_wavg(merge, x)
    for b in range(2):
        want, want_size = turbo_reference(x[b], metric[b], cls_attention[b], r, weight, class_token)
        torch.testing.assert_close(got[b], want)
        torch.testing.assert_close(size[b, :, 0], want_size)


def test_turbo_keeps_the_tokens_the_class_token_attends_to():
    # four identical pairs: plain ToMe would merge any of them; Turbo spares the A tokens with high CLS attention
    metric = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [1, 0.1], [0.2, 1], [0.2, 1], [1, -1], [1, -1], [0, 0.5]])[None]
    attention = torch.tensor([0.1, 0.0, 0.5, 0.0, 0.0, 0.0, 0.4, 0.0, 0.0])[None]
    x = torch.arange(9.0)[None, :, None]
    merge, _ = informativity_soft_matching(metric, attention, 1, 30.0, class_token=True)
    merged, size = merge_wavg(merge, x)
    # token 4 (no CLS attention) is the one merged (into 5); tokens 2 and 6 stay alone
    assert 4.0 not in merged[0, :, 0].tolist() and 4.5 in merged[0, :, 0].tolist()
    assert {2.0, 6.0} <= set(merged[0, :, 0].tolist())


def test_turbo_weight_schedule():
    assert turbo_semantic_weight(5, 1, 0, 7) == 150.0
    assert turbo_semantic_weight(1, 0.5, 2, 0) == pytest.approx(30 * 0.25)
    assert turbo_semantic_weight(1, 0.5, 2, 2) == 30.0


# ----------------------------------------------------------------------------------------------------------------
# CrossGET kernel


def crossget_reference(x, metric, importance, r, protected, group=None):
    """Loop CrossGET (methods.md §3b) for one sample: returns the merged tokens, their sizes and the kept indices."""
    n = x.shape[0]
    r = min(r, (n - int(protected.sum())) // 2)
    unit = metric / metric.norm(dim=-1, keepdim=True)

    def sim(i, j):
        if i == j or protected[i] or protected[j] or (group is not None and group[i] != group[j]):
            return -math.inf
        return float(unit[i] @ unit[j])

    best = [max(sim(i, j) for j in range(n)) for i in range(n)]
    ranking = sorted(range(n), key=lambda i: (-best[i], i))
    rank = {t: k for k, t in enumerate(ranking)}
    redundancy = [max([sim(i, j) for j in range(n) if rank[j] > rank[i]], default=-math.inf) for i in range(n)]
    score = [math.inf if protected[i] else float(importance[i]) - redundancy[i] for i in range(n)]
    order = sorted(range(n), key=lambda i: (score[i], i))
    sources, survivors = order[:r], sorted(order[r:])
    y, size = x.clone(), torch.ones(n)
    delta, added = torch.zeros_like(x), torch.zeros(n)
    for s in sources:
        d = max(survivors, key=lambda j: (sim(s, j), -j))
        w = torch.tensor([float(importance[s]), float(importance[d])]).softmax(0)
        delta[d] += 2 * w[0] * y[s] + (2 * w[1] - 1) * y[d]
        added[d] += 1
    y, size = y + delta, size + added
    return torch.stack([y[j] / size[j] for j in survivors]), size[survivors], survivors


@pytest.mark.parametrize("n,r,seed", [(8, 2, 0), (13, 5, 1), (20, 9, 2), (6, 10, 3)])
def test_crossget_matches_loop_reference(n, r, seed):
    gen = torch.Generator().manual_seed(seed)
    x, metric = torch.randn(3, n, 4, generator=gen), torch.randn(3, n, 6, generator=gen)
    importance = torch.randn(3, n, generator=gen) * 0.3
    protected = torch.zeros(3, n, dtype=torch.bool)
    protected[:, 0] = protected[:, -1] = True
    merge, kept, old_to_new = complete_graph_soft_matching(metric, importance, r, protected)
    got, size = merge(x)
    for b in range(3):
        want, want_size, survivors = crossget_reference(x[b], metric[b], importance[b], r, protected[b])
        assert kept[b].tolist() == survivors
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(size[b, :, 0], want_size)
        # every input token lands in a kept token, survivors in themselves
        assert [survivors[i] for i in old_to_new[b][survivors].tolist()] == survivors


def test_crossget_with_groups_matches_reference_and_never_mixes_groups():
    gen = torch.Generator().manual_seed(5)
    x, metric, importance = torch.randn(2, 12, 3, generator=gen), torch.randn(2, 12, 4, generator=gen), \
        torch.randn(2, 12, generator=gen)
    group = torch.tensor([[0] * 8 + [1] * 4, [0] * 5 + [1] * 7])
    protected = torch.zeros(2, 12, dtype=torch.bool)
    protected[:, 0] = True
    merge, kept, old_to_new = complete_graph_soft_matching(metric, importance, 4, protected, group)
    got, _ = merge(x)
    for b in range(2):
        want, _, survivors = crossget_reference(x[b], metric[b], importance[b], 4, protected[b], group[b])
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
        assert (group[b][kept[b][old_to_new[b]]] == group[b]).all()  # each token ends in a token of its group


def test_crossget_invariants():
    gen = torch.Generator().manual_seed(0)
    x, metric, importance = torch.randn(2, 15, 4, generator=gen), torch.randn(2, 15, 4, generator=gen), \
        torch.randn(2, 15, generator=gen)
    protected = torch.zeros(2, 15, dtype=torch.bool)
    protected[:, [0, 14]] = True
    assert complete_graph_soft_matching(metric, importance, 0, protected) is None  # identity at zero reduction
    merge, kept, _ = complete_graph_soft_matching(metric, importance, 6, protected)
    out, size = merge(x, torch.ones(2, 15, 1))
    assert out.shape == (2, 9, 4) and (kept.diff(dim=-1) > 0).all()  # order preserved
    assert (kept[:, 0] == 0).all() and (kept[:, -1] == 14).all()
    torch.testing.assert_close(out[:, [0, -1]], x[:, [0, 14]])  # protected tokens untouched
    assert (size.sum(dim=1) == 15).all()  # sizes add up to the original count
    # merging identical tokens loses nothing: duplicate every token, merge the copies away
    base = torch.randn(1, 6, 4, generator=gen)
    doubled = base.repeat_interleave(2, dim=1)
    merge, kept, _ = complete_graph_soft_matching(doubled, torch.zeros(1, 12), 6)
    out, size = merge(doubled)
    torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-6)
    assert (size == 2).all()


def test_keep_ratio_hits_the_closest_schedule():
    r = r_for_keep_ratio(197, 12, 0.25)
    last = token_schedule(197, [r] * 12)[1][-1]
    for other in (r - 1, r + 1):
        assert abs(token_schedule(197, [other] * 12)[1][-1] - 49.25) >= abs(last - 49.25)
    assert r_for_keep_ratio(197, 12, 1.0) == 0
    with pytest.raises(ValueError):
        r_for_keep_ratio(197, 12, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# the stage on built-in families

CASES = [("tiny-clip", "turbo", ["vision"]), ("tiny-siglip", "turbo", ["vision"]), ("tiny-blip", "turbo", ["vision"]),
         ("tiny-llava", "turbo", ["vision"]), ("tiny-clip", "crossget", ["vision", "text"]),
         ("tiny-siglip", "crossget", ["vision", "text"]), ("tiny-llava", "crossget", ["vision"])]

CHILD = """
import sys, json
sys.modules["vlmcompress"] = None
import torch
from safetensors.torch import load_file
from transformers import AutoModel
out, io = sys.argv[1], sys.argv[2]
inputs = load_file(io + "/inputs.safetensors")
model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
with torch.no_grad():
{snippet}
json.dump({{k: v.tolist() for k, v in result.items()}}, open(io + "/out.json", "w"))
"""


def reduce(name, algorithm, components, tmp_path, **knobs):
    out = tmp_path / "out"
    stage = {"method": "token_reduce", "algorithm": algorithm, "r": 3, "components": components} | knobs
    model = vlmcompress.apply({"model": name, "output": str(out), "stages": [stage]}, progress=False)
    return model, out


@pytest.mark.parametrize("name,algorithm,components", CASES)
def test_reduced_checkpoint_reloads_in_a_fresh_process(name, algorithm, components, tmp_path):
    from safetensors.torch import save_file
    from test_families import CHILD_MAIN_OUTPUTS

    adapter = BUILTIN_TINY[name]
    base = adapter.tiny_model()
    model, out = reduce(name, algorithm, components, tmp_path)
    inputs = adapter.example_inputs(model, batch_size=2, seed=0)
    with torch.no_grad():
        expected = adapter.main_outputs(model, inputs)
        unreduced = adapter.main_outputs(base, inputs)
    # tokens after every vision layer, measured with hooks, equal the schedule in the checkpoint
    config = json.loads((out / "config.json").read_text())
    towers = {t["component"]: t for t in config["token_reduction"]["towers"]}
    assert set(towers) == set(components)
    seen = []
    layers = model.get_submodule(towers["vision"]["layers_path"])
    hooks = [layer.register_forward_hook(lambda m, a, o: seen.append(o.shape[1])) for layer in layers]
    with torch.no_grad():
        adapter.main_outputs(model, inputs)
    for h in hooks:
        h.remove()
    schedule = towers["vision"]["tokens_per_layer"]
    assert seen[:len(schedule)] == schedule and schedule[-1] < towers["vision"]["num_tokens"]
    # the reduction changes the outputs
    change = max((expected[k].float() - unreduced[k].float()).abs().max().item() for k in expected)
    assert change > 1e-5, change

    io = tmp_path / "io"
    io.mkdir()
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(io / "inputs.safetensors"))
    snippet = textwrap.indent(textwrap.dedent(CHILD_MAIN_OUTPUTS[name]).strip(), "    ")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", CHILD.format(snippet=snippet), str(out), str(io)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((io / "out.json").read_text())
    for k, v in expected.items():
        torch.testing.assert_close(torch.tensor(got[k], dtype=v.dtype), v, rtol=0, atol=1e-5)
    loaded = vlmcompress.load(out)
    with torch.no_grad():
        again = adapter.main_outputs(loaded, inputs)
    for k, v in expected.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["tome", "turbo", "crossget"])
def test_batch_equals_per_sample(algorithm, tmp_path):
    model, _ = reduce("tiny-clip", algorithm, ["vision"], tmp_path)
    pixels = BUILTIN_TINY["tiny-clip"].example_inputs(model, batch_size=3, seed=1)["pixel_values"]
    with torch.no_grad():
        batch = model.get_image_features(pixel_values=pixels).pooler_output
        single = torch.cat([model.get_image_features(pixel_values=p[None]).pooler_output for p in pixels])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)


def test_crossget_text_tower_keeps_length_and_never_merges_padding_into_text(tmp_path):
    model, out = reduce("tiny-clip", "crossget", ["text"], tmp_path)
    state = model.text_model._vlmc_state
    ids = torch.tensor([[1, 10, 11, 12, 13, 14, 15, 3, 0, 0, 0, 0], [1, 20, 21, 3, 0, 0, 0, 0, 0, 0, 0, 0]])
    mask = (torch.arange(12) < torch.tensor([[8], [4]])).long()
    with torch.no_grad():
        hidden = model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert hidden.shape == (2, 12, 32) and torch.isfinite(hidden).all()
    assert state.tokens == [9, 6]  # 12 → 9 → 6 (r = 3 per layer)
    # every padding position ends up in a padding token and every text position in a text token
    valid_after = torch.zeros(2, 6, dtype=torch.bool)
    valid_after.scatter_(1, state.old_to_new, mask.bool())
    assert (valid_after.gather(1, state.old_to_new) == mask.bool()).all()
    # the end-of-text and first tokens are never merged: their final states are their own
    eot = torch.tensor([7, 3])
    assert (state.old_to_new[torch.arange(2), eot] != state.old_to_new[torch.arange(2), eot - 1]).all()


def test_turbo_knobs_reach_the_checkpoint_and_are_validated(tmp_path):
    model, out = reduce("tiny-clip", "turbo", ["vision"], tmp_path, alpha=2.0, r_threshold=12)
    block = json.loads((out / "config.json").read_text())["token_reduction"]
    assert block["options"] == {"alpha": 2.0, "beta": 1.0, "gamma": 0.0, "r_threshold": 12, "text_step": 0.07,
                                "text_min_keep": 0.2}
    # 65 tokens: layer 0 merges 3 (65 ≥ 12), layer 1 merges 3
    assert block["towers"][0]["tokens_per_layer"] == [62, 59]
    with pytest.raises(VlmCompressError, match="alpha does not apply to algorithm: tome .only to turbo.; remove it"):
        vlmcompress.apply({"model": "tiny-clip", "output": str(tmp_path / "x"),
                           "stages": [{"method": "token_reduce", "alpha": 2.0}]}, progress=False)
    with pytest.raises(VlmCompressError, match="turbo reduces only vision tokens on a clip model"):
        vlmcompress.apply({"model": "tiny-clip", "output": str(tmp_path / "y"),
                           "stages": [{"method": "token_reduce", "algorithm": "turbo", "components": ["text"]}]},
                          progress=False)
    with pytest.raises(VlmCompressError, match="no text tower"):
        vlmcompress.apply({"model": "tiny-blip", "output": str(tmp_path / "z"),
                           "stages": [{"method": "token_reduce", "algorithm": "crossget", "components": ["text"]}]},
                          progress=False)
    with pytest.raises(VlmCompressError, match="keep_ratio"):
        vlmcompress.apply({"model": "tiny-clip", "output": str(tmp_path / "w"),
                           "stages": [{"method": "token_reduce", "keep_ratio": 1.5}]}, progress=False)


def test_keep_ratio_in_a_recipe(tmp_path):
    out = tmp_path / "out"
    vlmcompress.apply({"model": "tiny-clip", "output": str(out),
                       "stages": [{"method": "token_reduce", "algorithm": "crossget", "keep_ratio": 0.5}]},
                      progress=False)
    tower = json.loads((out / "config.json").read_text())["token_reduction"]["towers"][0]
    assert abs(tower["tokens_per_layer"][-1] - 0.5 * 65) <= 2


def test_crossget_on_llava_follows_the_llava_rules(tmp_path):
    """LLaVA's vision tower (sdc17/CrossGET `LLaVA/llava/model/reducer.py`): layer 0 rebuilt from stock modules —
    the cross token (a copy of CLS, zero offset) appended, eager attention, importance = mean attention received from
    the non-cross queries + attention received from the cross token (heads averaged), matching on keys averaged
    over heads — equals the reduced layer. The CLIP rules (key / cross-query cosine, full-width keys) give other
    tokens on this input."""
    from vlmcompress.modeling.crossget import complete_graph_soft_matching

    model, _ = reduce("tiny-llava", "crossget", ["vision"], tmp_path, r=8)
    assert model.config.token_reduction["options"] == {"scoring": "llava"}
    stock = BUILTIN_TINY["tiny-llava"].tiny_model(0)
    pixels = BUILTIN_TINY["tiny-llava"].example_inputs(stock, batch_size=2, seed=3)["pixel_values"]
    vision = stock.model.vision_tower
    layer = vision.encoder.layers[0]
    attn = layer.self_attn
    with torch.no_grad():
        x = vision.pre_layrnorm(vision.embeddings(pixels))
        x = torch.cat([x, x[:, :1]], dim=1)  # the cross token
        b, n, _ = x.shape
        h = layer.layer_norm1(x)
        q = attn.q_proj(h).view(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(h).view(b, n, attn.num_heads, -1).transpose(1, 2)
        v = attn.v_proj(h).view(b, n, attn.num_heads, -1).transpose(1, 2)
        probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)  # [B, H, N, N]
        y = x + attn.out_proj((probs @ v).transpose(1, 2).reshape(b, n, -1))
        received = probs.mean(dim=1)  # [B, queries, keys]
        importance = received[:, :-1].mean(dim=1) + received[:, -1]
        protected = torch.zeros(b, n, dtype=torch.bool)
        protected[:, 0] = protected[:, -1] = True
        merge, kept, _ = complete_graph_soft_matching(k.mean(dim=1), importance, 8, protected=protected,
                                                      num_protected=2)
        y, _ = merge(y)
        y = y + layer.mlp(layer.layer_norm2(y))
        expected = y[:, :-1]
        got = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
        clip_rules = complete_graph_soft_matching(
            k.transpose(1, 2).reshape(b, n, -1),
            torch.nn.functional.cosine_similarity(k.transpose(1, 2).reshape(b, n, -1),
                                                  q.transpose(1, 2).reshape(b, n, -1)[:, -1:], dim=-1),
            8, protected=protected, num_protected=2)[1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.equal(clip_rules, kept)
