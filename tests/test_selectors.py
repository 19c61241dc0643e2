"""Module selectors (`vlmcompress.stages.selectors`) and the `structured_prune` stage on tiny CLIP: which modules a
recipe touches, which heads / neurons go, and that the right ones go."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import vlmcompress  # noqa: E402
from vlmcompress.adapters import BUILTIN_TINY, adapter_for  # noqa: E402
from vlmcompress.errors import NoMatchingModulesError, VlmCompressError  # noqa: E402
from vlmcompress.selectors import check_selectors, matches  # noqa: E402
from vlmcompress.stages.structured_prune import (  # noqa: E402
    StructuredPruneConfig,
    StructuredPruneStage,
    choose_removals,
)

LAYER0 = "re:vision_model\\.encoder\\.layers\\.0\\..*"
HEAD_DIM = 8  # tiny CLIP: hidden 32, 4 heads


def tiny_clip():
    return BUILTIN_TINY["tiny-clip"].tiny_model()


def shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def prune(stage: dict, model=None):
    recipe = {"model": "tiny-clip", "output": "unused", "stages": [{"method": "structured_prune", **stage}]}
    return vlmcompress.apply(recipe, model=model, save=False, progress=False)


def forward_ok(model):
    adapter = adapter_for(model)
    with torch.no_grad():
        out = adapter.main_outputs(model, adapter.example_inputs(model))
    for value in out.values():
        assert torch.isfinite(value).all()


@pytest.fixture(scope="module")
def names():
    return [n for n, _ in tiny_clip().named_modules()]


# ----------------------------------------------------------------------------------------------------------------
# selectors


def test_matches_exact_and_regex():
    assert matches("vision_model.encoder", "vision_model.encoder")
    assert not matches("vision_model.encoder", "vision_model.encoder.layers")
    assert matches("re:.*fc1", "vision_model.encoder.layers.0.mlp.fc1")
    assert not matches("re:fc1", "vision_model.encoder.layers.0.mlp.fc1")  # full match, not search
    assert not matches("re:vision_model", "vision_model.encoder")
    assert not matches(".*fc1", "vision_model.encoder.layers.0.mlp.fc1")  # no `re:`: a literal name


def test_check_selectors_accepts_exact_names_and_patterns(names):
    check_selectors([], names, "x.ignore")
    check_selectors(["vision_model.encoder.layers.0.mlp.fc1", "re:text_model\\.encoder\\.layers\\.\\d+\\.mlp",
                     LAYER0], names, "x.ignore")


def test_unmatched_selector_lists_closest_names(names):
    with pytest.raises(NoMatchingModulesError) as info:
        check_selectors(["vision_model.encoder.layers.0.mlp", "vision_model.encoder.layer.1.mlp"], names,
                        "structured_prune.ignore")
    message = str(info.value)
    assert message.startswith("structured_prune.ignore: selector 'vision_model.encoder.layer.1.mlp' matches no module")
    closest_part = message.split("closest module names: ")[1]
    assert "vision_model.encoder.layers.1.mlp" in closest_part.split(";")[0]
    assert "re:" in message  # says how to write a pattern


def test_unmatched_regex_selector(names):
    with pytest.raises(NoMatchingModulesError, match=r"'re:fc1' matches no module"):
        check_selectors(["re:fc1"], names, "k")


def test_unmatched_selector_without_close_names(names):
    with pytest.raises(NoMatchingModulesError) as info:
        check_selectors(["qqqqqqqq"], names, "k")
    assert "closest module names" not in str(info.value)


def test_invalid_regex_is_reported(names):
    with pytest.raises(NoMatchingModulesError) as info:
        check_selectors(["re:vision_model.(encoder"], names, "structured_prune.ignore")
    message = str(info.value)
    assert message.startswith("structured_prune.ignore: 're:vision_model.(encoder' is not a valid regular expression")
    assert "missing )" in message


# ----------------------------------------------------------------------------------------------------------------
# structured_prune: check()


def stage(**config):
    return StructuredPruneStage(StructuredPruneConfig.parse({"method": "structured_prune", **config}))


def test_check_accepts_ignore_pattern():
    model = tiny_clip()
    stage(ignore=[LAYER0]).check(model, adapter_for(model))


def test_check_rejects_unmatched_ignore():
    model = tiny_clip()
    with pytest.raises(NoMatchingModulesError, match="structured_prune.ignore: selector 'vision_model.layers.0'"):
        stage(ignore=["vision_model.layers.0"]).check(model, adapter_for(model))


def test_check_rejects_component_the_model_lacks():
    model = tiny_clip()
    with pytest.raises(VlmCompressError) as info:
        stage(ratio={"vision": 0.5, "llm": 0.5}).check(model, adapter_for(model))
    message = str(info.value)
    assert "['llm']" in message and "CLIPModel" in message and "vision, text" in message


def test_apply_checks_before_running():
    with pytest.raises(NoMatchingModulesError):
        prune({"ratio": 0.5, "ignore": ["re:vision_model\\.encoder\\.layers\\.7\\..*"]})


# ----------------------------------------------------------------------------------------------------------------
# structured_prune: run on tiny CLIP


def test_ignored_layer_is_untouched_and_others_shrink():
    base = tiny_clip()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = prune({"ratio": 0.5, "ignore": [LAYER0]})
    after = shapes(model)
    layer0 = [n for n in after if n.startswith("vision_model.encoder.layers.0.")]
    assert layer0
    for name in layer0:
        assert after[name] == tuple(base_state[name].shape), name
        assert torch.equal(model.state_dict()[name], base_state[name]), name
    assert model.vision_model.encoder.layers[0].self_attn.num_heads == 4
    for prefix in ("vision_model.encoder.layers.1.", "text_model.encoder.layers.0.", "text_model.encoder.layers.1."):
        assert after[prefix + "self_attn.q_proj.weight"][0] < 32, prefix
        assert after[prefix + "mlp.fc1.weight"][0] < 64, prefix
    matched = model.vlmcompress_report["stages"][0]["matched"]
    assert not any(m.startswith("vision_model.encoder.layers.0.") for m in matched)
    forward_ok(model)


def test_vision_only_ratio_leaves_text_tower_alone():
    base = shapes(tiny_clip())
    after = shapes(prune({"ratio": {"vision": 0.5}}))
    text = [n for n in base if n.startswith("text_model.")]
    assert text and all(after[n] == base[n] for n in text)
    changed = [n for n in base if after[n] != base[n]]
    assert changed and all(n.startswith("vision_model.encoder.layers.") for n in changed)
    assert sum(after[f"vision_model.encoder.layers.{i}.self_attn.q_proj.weight"][0] for i in (0, 1)) == 32
    assert sum(after[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"][0] for i in (0, 1)) == 64


def test_mlp_target_leaves_heads_alone():
    base = shapes(tiny_clip())
    model = prune({"ratio": 0.5, "targets": ["mlp"]})
    after = shapes(model)
    attention = [n for n in base if ".self_attn." in n]
    assert attention and all(after[n] == base[n] for n in attention)
    for module in model.modules():
        if hasattr(module, "num_heads") and hasattr(module, "q_proj"):
            assert module.num_heads == 4
    assert any(after[n] != base[n] for n in base if ".mlp." in n)
    forward_ok(model)


def test_global_ranking_keeps_one_head_and_neuron_per_layer():
    model = prune({"ratio": 0.99})
    layers = [*model.vision_model.encoder.layers, *model.text_model.encoder.layers]
    for layer in layers:
        # 0.99 of 8 heads / 128 neurons per tower rounds to all of them: each layer keeps exactly its last one
        assert layer.self_attn.num_heads == 1
        assert layer.self_attn.q_proj.weight.shape == (HEAD_DIM, 32)
        assert layer.self_attn.out_proj.weight.shape == (32, HEAD_DIM)
        assert layer.mlp.fc1.weight.shape == (1, 32) and layer.mlp.fc2.weight.shape == (32, 1)
    forward_ok(model)


def _head_rows(weight, heads):
    return torch.cat([weight[h * HEAD_DIM:(h + 1) * HEAD_DIM] for h in heads])


@pytest.mark.parametrize("layer, weak", [(1, 2), (0, 0), (1, 3)])
def test_head_pruning_removes_exactly_the_weakest_head(layer, weak):
    model = tiny_clip()
    attn = model.vision_model.encoder.layers[layer].self_attn
    rows = slice(weak * HEAD_DIM, (weak + 1) * HEAD_DIM)
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight[rows] *= 1e-3
            proj.bias[rows] *= 1e-3
        attn.out_proj.weight[:, rows] *= 1e-3
    original = {k: v.clone() for k, v in attn.state_dict().items()}

    pruned = prune({"ratio": {"vision": 0.25}, "targets": ["heads"], "global_ranking": False}, model=model)
    after = pruned.vision_model.encoder.layers[layer].self_attn
    kept = [h for h in range(4) if h != weak]
    assert after.num_heads == 3
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(after, proj).weight, _head_rows(original[f"{proj}.weight"], kept)), proj
        assert torch.equal(getattr(after, proj).bias, _head_rows(original[f"{proj}.bias"], kept)), proj
    assert torch.equal(after.out_proj.weight, _head_rows(original["out_proj.weight"].T, kept).T)
    assert torch.equal(after.out_proj.bias, original["out_proj.bias"])
    # per-layer ranking: every vision layer lost one head, the text tower none
    for other in pruned.vision_model.encoder.layers:
        assert other.self_attn.num_heads == 3
    for other in pruned.text_model.encoder.layers:
        assert other.self_attn.num_heads == 4
    details = pruned.vlmcompress_report["stages"][0]["details"]["per_module"]
    assert details[f"vision_model.encoder.layers.{layer}.self_attn"]["heads"] == [4, 3]
    forward_ok(pruned)


def test_neuron_pruning_removes_exactly_the_weakest_neuron():
    model = tiny_clip()
    mlp = model.vision_model.encoder.layers[0].mlp
    weak = 37
    with torch.no_grad():
        mlp.fc1.weight[weak] = 0.0
        mlp.fc1.bias[weak] = 0.0
        mlp.fc2.weight[:, weak] = 0.0
    original = {k: v.clone() for k, v in mlp.state_dict().items()}
    pruned = prune({"ratio": {"vision": 1 / 64}, "targets": ["mlp"], "global_ranking": False}, model=model)
    after = pruned.vision_model.encoder.layers[0].mlp
    keep = [i for i in range(64) if i != weak]
    assert torch.equal(after.fc1.weight, original["fc1.weight"][keep])
    assert torch.equal(after.fc1.bias, original["fc1.bias"][keep])
    assert torch.equal(after.fc2.weight, original["fc2.weight"][:, keep])
    assert torch.equal(after.fc2.bias, original["fc2.bias"])


# ----------------------------------------------------------------------------------------------------------------
# choose_removals on hand-made scores


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_global_ranking_is_non_uniform():
    scores = {"a": t(1, 2, 3, 10), "b": t(4, 5, 6, 7)}
    # normalised: a = [.25, .5, .75, 2.5], b = [.73, .91, 1.09, 1.27]; 4 of 8 go
    removals = choose_removals(scores, 0.5, global_ranking=True)
    assert sorted(removals["a"]) == [0, 1, 2]
    assert removals["b"] == [0]


def test_per_layer_ranking_is_uniform():
    scores = {"a": t(1, 2, 3, 10), "b": t(7, 4, 6, 5)}
    removals = choose_removals(scores, 0.5, global_ranking=False)
    assert sorted(removals["a"]) == [0, 1]
    assert sorted(removals["b"]) == [1, 3]


def test_mean_normalisation_compares_layers_fairly():
    # b's raw scores are 10x a's; without normalisation a global ranking would take three from a
    scores = {"a": t(1, 2, 3, 4), "b": t(10, 20, 30, 40)}
    removals = choose_removals(scores, 0.5, global_ranking=True)
    assert sorted(removals["a"]) == [0, 1] and sorted(removals["b"]) == [0, 1]
    # scaling a whole layer changes nothing
    scaled = choose_removals({"a": t(1, 2, 3, 4) * 1000, "b": t(10, 20, 30, 40)}, 0.5, global_ranking=True)
    assert {k: sorted(v) for k, v in scaled.items()} == {k: sorted(v) for k, v in removals.items()}


def test_budget_rounding_and_keep_one():
    scores = {"a": t(1, 2), "b": t(3, 1, 2)}
    removals = choose_removals(scores, 0.99, global_ranking=True)
    assert len(removals["a"]) == 1 and len(removals["b"]) == 2
    assert removals["a"] == [0] and sorted(removals["b"]) == [1, 2]
    per_layer = choose_removals(scores, 0.99, global_ranking=False)
    assert per_layer == {"a": [0], "b": [1, 2]}
    assert choose_removals(scores, 0.0, global_ranking=True) == {"a": [], "b": []}
    assert choose_removals(scores, 0.0, global_ranking=False) == {"a": [], "b": []}
    # 0.25 of 5 rounds to 1
    assert sum(len(v) for v in choose_removals(scores, 0.25, global_ranking=True).values()) == 1


def test_single_unit_layers_are_never_emptied():
    scores = {"a": t(5), "b": t(1), "c": t(1, 2, 3, 4)}
    removals = choose_removals(scores, 0.9, global_ranking=True)
    assert removals["a"] == [] and removals["b"] == []
    assert sorted(removals["c"]) == [0, 1, 2]


def test_all_zero_scores_do_not_divide_by_zero():
    removals = choose_removals({"a": torch.zeros(4), "b": t(1, 2, 3, 4)}, 0.5, global_ranking=True)
    assert len(removals["a"]) + len(removals["b"]) == 4
    assert len(removals["a"]) <= 3 and len(removals["b"]) <= 3


def test_ignoring_a_whole_layer_protects_its_units():
    import vlmcompress
    from vlmcompress.adapters import BUILTIN_TINY

    base = BUILTIN_TINY["tiny-clip"].tiny_model()
    shapes = {n: p.shape for n, p in base.named_parameters()}
    recipe = {"model": "tiny-clip", "output": "unused", "stages": [
        {"method": "structured_prune", "ratio": 0.5, "ignore": ["vision_model.encoder.layers.0"]}]}
    model = vlmcompress.apply(recipe, save=False, progress=False)
    after = {n: p.shape for n, p in model.named_parameters()}
    layer0 = [n for n in shapes if n.startswith("vision_model.encoder.layers.0.")]
    layer1 = [n for n in shapes if n.startswith("vision_model.encoder.layers.1.") and n.endswith("q_proj.weight")]
    assert layer0 and all(after[n] == shapes[n] for n in layer0)
    assert layer1 and all(after[n][0] < shapes[n][0] for n in layer1)


def test_empty_ratio_map_is_an_error():
    import vlmcompress
    from vlmcompress.errors import VlmCompressError

    recipe = {"model": "tiny-clip", "output": "unused", "stages": [{"method": "structured_prune", "ratio": {}}]}
    with pytest.raises(VlmCompressError, match="empty map"):
        vlmcompress.apply(recipe, save=False, progress=False)


def test_ignore_by_projection_name_in_blip2_qformer():
    import vlmcompress

    base = BUILTIN_TINY["tiny-blip2"].tiny_model()
    name = "qformer.encoder.layer.0.output_query.dense.weight"
    recipe = {"model": "tiny-blip2", "output": "unused", "stages": [
        {"method": "structured_prune", "ratio": 0.5, "targets": ["mlp"],
         "ignore": ["qformer.encoder.layer.0.output_query.dense"]}]}
    model = vlmcompress.apply(recipe, save=False, progress=False)
    after = dict(model.named_parameters())
    assert after[name].shape == dict(base.named_parameters())[name].shape
    other = "qformer.encoder.layer.1.output_query.dense.weight"
    assert after[other].shape[1] < dict(base.named_parameters())[other].shape[1]
