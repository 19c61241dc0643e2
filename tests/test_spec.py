"""The typed checkpoint records (`modeling/spec.py`): what is written is what is read back, version 1 blocks read as
variant 1, and a record that breaks its schema is refused with a line that says which key and why."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import vlmcompress
from vlmcompress.adapters import BUILTIN_TINY
from vlmcompress.modeling.reduction import token_sources
from vlmcompress.modeling.spec import (
    FORMAT_VERSION,
    CheckpointRecord,
    QuantizationSpec,
    SpecError,
    TokenReductionSpec,
    token_reduction,
)


def tome_block():
    return {"algorithm": "tome", "options": {}, "towers": [
        {"component": "vision", "layers_path": "vision_model.encoder.layers", "r": [8, 8], "requested_r": [8, 8],
         "class_token": True, "proportional_attention": True, "num_tokens": 65, "tokens_per_layer": [57, 49]}]}


def test_a_version_1_block_reads_as_variant_1_and_round_trips():
    block = tome_block()
    spec = TokenReductionSpec.read(block)
    assert spec.variant == 1 and spec.tower("vision").tokens_in == [65, 57] and spec.tower("text") is None
    assert spec.to_dict() == block | {"variant": 1}
    assert TokenReductionSpec.read(spec.to_dict()) == spec


@pytest.mark.parametrize("edit,words", [
    (lambda b: b["towers"][0].update(forward="os.system"), "unknown key(s) ['forward']"),
    (lambda b: b["towers"][0].update(num_tokens="65"), "token_reduction.towers[0].num_tokens must be int"),
    (lambda b: b["towers"][0].pop("layers_path"), "lacks the key 'layers_path'"),
    (lambda b: b.update(towers={"a": 1}), "token_reduction.towers must be list"),
])
def test_a_broken_block_is_refused_with_the_key(edit, words):
    block = tome_block()
    edit(block)
    with pytest.raises(SpecError) as e:
        TokenReductionSpec.read(block)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_newer_formats_and_bad_shape_records_are_refused():
    with pytest.raises(SpecError, match=f"version {FORMAT_VERSION + 1}, newer"):
        CheckpointRecord.read({"format_version": FORMAT_VERSION + 1})
    with pytest.raises(SpecError, match="param_shapes"):
        CheckpointRecord.read({"format_version": 2, "param_shapes": {"a.weight": ["__class__"]}})
    with pytest.raises(SpecError, match="quantization format is version 2"):
        QuantizationSpec.read({"format_version": 2})


@pytest.mark.parametrize("attrs, words", [
    ({"vision_model.encoder": {"__class__": 3}}, "not a dotted path of module names"),
    ({"vision_model.encoder": {"layers.0.self_attn._forward_hooks": 1}}, "not a dotted path"),
    ({"vision_model.encoder": {"gradient_checkpointing": 1}}, "not an attribute structured pruning sets"),
    ({"vision_model.__class__": {"num_heads": 2}}, "not a dotted path"),
    ({"vision_model.encoder.layers.0.self_attn": {"num_heads": True}}, "positive integers"),
])
def test_a_shape_record_sets_only_the_closed_list_of_attributes(attrs, words):
    with pytest.raises(SpecError) as e:
        CheckpointRecord.read({"format_version": 2, "module_attrs": attrs})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_crafted_module_attrs_fails_to_load_and_changes_no_class(tmp_path):
    """A checkpoint whose `module_attrs` reaches outside the model (a class attribute through `__class__`, or a
    method) is refused in one line by `vlmcompress.load` and by the remote-code class, and transformers' classes
    stay as they were."""
    from transformers.models.clip import modeling_clip

    out = tmp_path / "out"
    vlmcompress.apply({"model": "tiny-clip", "output": str(out),
                       "stages": [{"method": "structured_prune", "ratio": 0.5}]}, progress=False)
    config = json.loads((out / "config.json").read_text())
    before = dict(vars(modeling_clip.CLIPEncoder))
    for crafted in ({"vision_model.encoder": {"__class__.forward": 1}},
                    {"vision_model.encoder.layers.0": {"forward": 1}},
                    {"vision_model.encoder.layers.0.self_attn": {"k_proj.weight": 1}}):
        (out / "config.json").write_text(json.dumps(config | {"vlmcompress": config["vlmcompress"] |
                                                              {"module_attrs": crafted}}))
        with pytest.raises(Exception) as e:
            vlmcompress.load(out)
        assert "module_attrs" in str(e.value) and "\n" not in str(e.value), str(e.value)
        run = subprocess.run([sys.executable, "-m", "vlmcompress", "inspect", str(out)], capture_output=True,
                             text=True, check=False)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert dict(vars(modeling_clip.CLIPEncoder)) == before


def test_a_new_checkpoint_writes_format_3_with_variants_and_the_stock_model_type_and_loads(tmp_path):
    out = tmp_path / "out"
    vlmcompress.apply({"model": "tiny-clip", "output": str(out),
                       "stages": [{"method": "token_reduce", "algorithm": "turbo", "r": 4},
                                  {"method": "quantize", "backend": "torch", "scheme": "int8_dynamic"}]},
                      BUILTIN_TINY["tiny-clip"].tiny_model(0), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["vlmcompress"]["format_version"] == 3 == FORMAT_VERSION
    assert config["model_type"] == "clip" and config["architectures"] == ["VlmcCLIPModel"]
    assert config["token_reduction"]["variant"] == 1
    assert set(QuantizationSpec.read(config["quantization"]).schemes) == {"vision", "text"}
    assert token_reduction(vlmcompress.load(out).config).options["alpha"] == 5.0


def test_a_compressed_config_round_trips_through_its_stock_model_type_on_disk(tmp_path):
    out = tmp_path / "out"
    vlmcompress.apply({"model": "tiny-clip", "output": str(out), "stages": [{"method": "token_reduce", "r": 4}]},
                      BUILTIN_TINY["tiny-clip"].tiny_model(0), progress=False)
    config = vlmcompress.load(out).config
    assert config.model_type == "vlmcompress_clip" and config.to_dict()["model_type"] == "clip"
    cls = type(config)
    config.to_json_file(tmp_path / "again.json")
    for copy in (cls.from_dict(config.to_dict()), cls.from_json_file(tmp_path / "again.json")):
        # the stock type read back must not shadow the class's own on the instance
        assert copy.model_type == "vlmcompress_clip", copy.model_type
        assert {**copy.to_dict(), "_name_or_path": ""} == {**config.to_dict(), "_name_or_path": ""}
        assert token_reduction(copy).towers[0].r == token_reduction(config).towers[0].r


def test_a_hand_edited_config_fails_in_one_line(tmp_path):
    out = tmp_path / "out"
    vlmcompress.apply({"model": "tiny-clip", "output": str(out), "stages": [{"method": "token_reduce", "r": 4}]},
                      BUILTIN_TINY["tiny-clip"].tiny_model(0), progress=False)
    config = json.loads((out / "config.json").read_text())
    config["token_reduction"]["towers"][0]["r"] = "8"
    (out / "config.json").write_text(json.dumps(config))
    run = subprocess.run([sys.executable, "-m", "vlmcompress", "inspect", str(out)], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "token_reduction.towers[0].r must be list" in run.stderr + run.stdout


@pytest.mark.parametrize("name,stage,merging", [
    ("tiny-clip", {"algorithm": "tome", "r": 6}, True),
    ("tiny-clip", {"algorithm": "turbo", "r": 6}, True),
    ("tiny-clip", {"algorithm": "crossget", "r": 6}, True),
    ("tiny-llava", {"algorithm": "visionzip", "keep_ratio": 0.4}, False),
    ("tiny-llava", {"algorithm": "prumerge", "mode": "fixed", "keep_ratio": 0.3}, False),
    ("tiny-llava", {"algorithm": "fastv", "layer": 1, "keep_ratio": 0.25}, False),
])
def test_every_reducer_says_which_input_tokens_each_output_token_holds(name, stage, merging, tmp_path):
    adapter = BUILTIN_TINY[name]
    recipe = {"model": name, "output": str(tmp_path / "out"), "stages": [{"method": "token_reduce", **stage}]}
    model = vlmcompress.apply(recipe, adapter.tiny_model(0), progress=False).eval()
    inputs = adapter.example_inputs(model, batch_size=2)
    token_sources(model, trace=True)
    with torch.no_grad():
        model(**inputs)
    sources = token_sources(model)
    tower = token_reduction(model.config).towers[0]
    got = sources[tower.component]
    n_out = tower.tokens_per_layer[-1] if tower.component != "llm" else got.shape[1]
    assert got.dtype == torch.bool and got.shape[0] == 2 and got.shape[1] == n_out
    if merging:  # every input token ends up in exactly one output token; the class token stays alone at 0
        assert got.shape[2] == tower.num_tokens
        assert (got.sum(dim=1) == 1).all() and got[:, 0, 0].all() and got[:, 0].sum() == 2
    else:  # every output token stands at one input position, each position taken once
        assert (got.sum(dim=2) == 1).all() and (got.sum(dim=1) <= 1).all()
    if tower.component == "llm":  # FastV keeps every text token and the chosen image tokens
        image = inputs["input_ids"] == model.config.image_token_id
        kept_image = (got.float() @ image[..., None].float())[..., 0].sum(dim=1)
        assert (kept_image == tower.tokens_per_layer[-1]).all()
