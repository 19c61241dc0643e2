"""The plan-time FLOPs estimate (`measure/estimate.py`, what `validate` and `--dry-run` print) equals what
`FlopCounterMode` counts in the same towers when the model runs: on a tiny model of every family, unreduced and under
every token-reduction algorithm with a fixed schedule, per layer and in total (|estimate − measured| / measured <
1e-6). The measured side reads the counter's running total around each layer (forward hooks), so nothing here
shares the estimate's arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlmcompress
from vlmcompress.adapters import BUILTIN_TINY
from vlmcompress.measure.estimate import embedding_flops, layer_flops, layer_shapes, tower_flops
from vlmcompress.measure.flops import _flop_mapping
from vlmcompress.measure.workloads import prompt_ids
from vlmcompress.modeling.reduction import REDUCERS
from vlmcompress.modeling.spec import token_reduction
from vlmcompress.stages.token_reduce.llava import PROMPT_TEXT_TOKENS


def measured_flops(modules: dict[str, torch.nn.Module], run) -> dict[str, int]:
    """FLOPs counted inside each module during `run()` (the counter's total after minus before its forward)."""
    spans: dict[str, list[int]] = {}
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        hooks = []
        for name, module in modules.items():
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, n=name: spans.__setitem__(n, [counter.get_total_flops()])))
            hooks.append(module.register_forward_hook(
                lambda m, a, o, n=name: spans[n].append(counter.get_total_flops())))
        try:
            with torch.no_grad():
                run()
        finally:
            for h in hooks:
                h.remove()
    return {name: after - before for name, (before, after) in spans.items()}


def text_ids(model, n: int) -> torch.Tensor:
    """One text of exactly `n` tokens ending with the end-of-text token (the tower's planned length)."""
    config = model.config.text_config
    ids = torch.randint(5, config.vocab_size - 1, (1, n), generator=torch.Generator().manual_seed(0))
    ids[0, -1] = config.eos_token_id if config.eos_token_id not in (None, 2) else config.vocab_size - 1
    return ids


def run_tower(model, adapter, component: str):
    """A call that runs `component` once on one sample at the planned token count."""
    family = adapter.family
    if component == "vision":
        pixels = adapter.example_inputs(model, batch_size=1)["pixel_values"]
        if family == "llava":
            return lambda: model.model.get_image_features(pixel_values=pixels)
        return lambda: model.get_image_features(pixel_values=pixels) if family != "blip" else \
            model.vision_model(pixel_values=pixels)
    if component == "text":
        ids = text_ids(model, adapter.text_tower(model).num_tokens)
        return lambda: model.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids))
    ids = prompt_ids(model, family, 1)  # llm: the LLaVA prefill (one image, a 32-token prompt)
    pixels = adapter.example_inputs(model, batch_size=1)["pixel_values"]
    return lambda: model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))


def check(model, adapter, component: str):
    """Per layer and in total, the estimate for `component` equals the measured count."""
    spec = token_reduction(model.config)
    tower = None if spec is None else spec.tower(component)
    layers_path = (adapter.component_paths["llm"] + ".layers" if component == "llm" else
                   (adapter.vision_tower(model) if component == "vision" else adapter.text_tower(model)).layers_path)
    layers = model.get_submodule(layers_path)
    if component == "llm":
        from vlmcompress.modeling.llava_tokens import llava_image_token_counts

        n_image = llava_image_token_counts(model.config)[1]
        tokens_in = tower.tokens_in if tower is not None else [n_image] * len(layers)
        extra = PROMPT_TEXT_TOKENS
    else:
        n0 = (adapter.vision_tower(model) if component == "vision" else adapter.text_tower(model)).num_tokens
        tokens_in, extra = (tower.tokens_in if tower is not None else [n0] * len(layers)), 0
    r = tower.r if tower is not None else [0] * len(layers)
    reducer = REDUCERS[spec.algorithm] if tower is not None else None
    options = spec.options if spec is not None else {}

    modules = {f"layer {i}": layer for i, layer in enumerate(layers)}
    convs = [m for m in model.get_submodule(adapter.component_paths[component]).modules()
             if isinstance(m, torch.nn.Conv2d)] if component == "vision" else []
    modules |= {f"conv {i}": conv for i, conv in enumerate(convs)}
    got = measured_flops(modules, run_tower(model, adapter, component))

    for i, (shape, n, removed) in enumerate(zip(layer_shapes(model, adapter, component), tokens_in, r)):
        want = layer_flops(shape, n + extra, removed, reducer, options)
        assert abs(want - got[f"layer {i}"]) <= 1e-6 * got[f"layer {i}"], (component, i, want, got[f"layer {i}"])
    assert embedding_flops(model, adapter, component) == sum(got[f"conv {i}"] for i in range(len(convs)))
    estimate = tower_flops(model, adapter, component, tokens_in, r, spec.algorithm if tower else None, options,
                           extra)
    measured = sum(got.values())
    assert measured > 0 and abs(estimate - measured) / measured < 1e-6, (estimate, measured)


COMPONENTS = {"tiny-clip": ["vision", "text"], "tiny-siglip": ["vision", "text"], "tiny-blip": ["vision"],
              "tiny-blip2": ["vision"], "tiny-llava": ["vision", "llm"]}


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_unreduced_towers(name):
    adapter = BUILTIN_TINY[name]
    model = adapter.tiny_model(0).eval().requires_grad_(False)
    for component in COMPONENTS[name]:
        check(model, adapter, component)


CASES = [
    ("tiny-clip", {"algorithm": "tome", "r": 6}),
    ("tiny-clip", {"algorithm": "turbo", "r": [6, 4], "gamma": 1.0}),
    ("tiny-clip", {"algorithm": "crossget", "r": 5, "components": ["vision", "text"]}),
    ("tiny-siglip", {"algorithm": "tome", "r": 7}),
    ("tiny-siglip", {"algorithm": "crossget", "r": 3, "components": ["vision", "text"]}),
    ("tiny-siglip", {"algorithm": "crossget", "r": 4}),
    ("tiny-blip", {"algorithm": "tome", "r": 8}),
    ("tiny-blip", {"algorithm": "turbo", "r": 8}),
    ("tiny-blip2", {"algorithm": "tome", "keep_ratio": 0.5}),
    ("tiny-llava", {"algorithm": "tome", "r": 4}),
    ("tiny-llava", {"algorithm": "crossget", "r": 4}),  # the LLaVA rules: attention received, head-mean keys
    ("tiny-llava", {"algorithm": "visionzip", "keep_ratio": 0.4}),
    ("tiny-llava", {"algorithm": "prumerge", "mode": "fixed", "keep_ratio": 0.3, "plus": True}),
    ("tiny-llava", {"algorithm": "prumerge", "mode": "fixed", "keep_ratio": 0.3}),
    ("tiny-llava", {"algorithm": "prumerge", "mode": "fixed", "keep_ratio": 0.3, "extra_token": False,
                    "neighbours": 0}),
    ("tiny-llava", {"algorithm": "fastv", "layer": 1, "keep_ratio": 0.25}),
]


@pytest.mark.parametrize("name,stage", CASES, ids=[f"{n}-{s['algorithm']}-{i}" for i, (n, s) in enumerate(CASES)])
def test_reduced_towers(name, stage, tmp_path):
    adapter = BUILTIN_TINY[name]
    recipe = {"model": name, "output": str(tmp_path / "out"), "stages": [{"method": "token_reduce", **stage}]}
    model = vlmcompress.apply(recipe, adapter.tiny_model(0), progress=False).eval().requires_grad_(False)
    spec = token_reduction(model.config)
    assert any(sum(t.r) > 0 for t in spec.towers)  # something is reduced
    for component in COMPONENTS[name]:
        check(model, adapter, component)
