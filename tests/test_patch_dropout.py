"""Patch dropout while training (`train.patch_dropout`, PatchDropout / FLIP): the kernel against hand-worked
numbers, the hook on every family that allows it (training forwards only), a finetune that trains with it and
reloads, and the recipes it refuses."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import vlmcompress
from vlmcompress.adapters import ADAPTERS
from vlmcompress.cli import app
from vlmcompress.train.patch_dropout import kept_count, keep_random_patches, patch_dropout

runner = CliRunner()


def test_kept_count_rounds_to_nearest_and_keeps_at_least_one():
    assert kept_count(100, 0.5) == 50
    assert kept_count(100, 0.75) == 25
    assert kept_count(100, 0.0) == 100
    assert kept_count(5, 0.5) == 3  # 2.5 rounds up
    assert kept_count(3, 0.99) == 1


def test_the_kept_patches_are_the_largest_noise_values_in_position_order():
    # torch.rand(2, 4) from seed 0 is [[0.4963, 0.7682, 0.0885, 0.1320], [0.3074, 0.6341, 0.4901, 0.8964]]:
    # keeping 2, row 0 keeps patches 0 and 1 (0.77, 0.50), row 1 patches 1 and 3 (0.63, 0.90)
    hidden = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)  # token t of row b holds 5b + t
    out = keep_random_patches(hidden, 2, class_token=True, generator=torch.Generator().manual_seed(0))
    assert out[..., 0].tolist() == [[0, 1, 2], [5, 7, 9]]  # class token first, then patches 0, 1 / 1, 3 (+1)
    no_class = keep_random_patches(hidden[:, 1:], 2, class_token=False, generator=torch.Generator().manual_seed(0))
    assert no_class[..., 0].tolist() == [[1, 2], [7, 9]]
    with pytest.raises(ValueError, match="keep 5"):
        keep_random_patches(hidden, 5, class_token=True)


@pytest.mark.parametrize("adapter", [a for a in ADAPTERS if a.variable_vision_tokens], ids=lambda a: a.family)
def test_only_training_forwards_drop_patches(adapter):
    model = adapter.tiny_model().train()
    inputs = adapter.example_inputs(model, batch_size=3)
    tower = adapter.vision_tower(model)
    layers = model.get_submodule(tower.layers_path)
    seen: list[int] = []
    handle = layers[-1].register_forward_hook(
        lambda module, args, out: seen.append((out[0] if isinstance(out, tuple) else out).shape[1]))
    patches = tower.num_tokens - int(tower.class_token)
    kept = kept_count(patches, 0.5) + int(tower.class_token)
    with patch_dropout(model, tower, 0.5):
        adapter.main_outputs(model, inputs)
        trained = set(seen)
        seen.clear()
        with torch.no_grad():
            adapter.main_outputs(model, inputs)
        frozen = set(seen)
        seen.clear()
        model.eval()
        adapter.main_outputs(model, inputs)
        evaluated = set(seen)
        seen.clear()
    model.train()
    adapter.main_outputs(model, inputs)  # the hook is gone
    handle.remove()
    assert trained == {kept} and frozen == evaluated == set(seen) == {tower.num_tokens}


def recipe(out, stages, model="shapes-clip-small"):
    return {"model": model, "output": str(out),
            "data": {"train": {"builtin": "shapes", "split": "train"},
                     "eval": {"builtin": "shapes", "split": "test", "size": 100}},
            "stages": stages}


def test_a_finetune_with_patch_dropout_trains_reports_and_reloads(tmp_path):
    def run(name, rate):
        finetune = {"method": "finetune", "train": {"steps": 4, "batch_size": 16, "lr": 1e-3, "patch_dropout": rate}}
        model = vlmcompress.apply(recipe(tmp_path / name, [finetune]), progress=False)
        return model, load_file(str(tmp_path / name / "model.safetensors"))

    dropped, weights = run("dropped", 0.5)
    _, plain = run("plain", 0.0)
    details = dropped.vlmcompress_report["stages"][0]["details"]
    assert details["patch_dropout"] == 0.5 and details["steps"] == 4
    assert max((weights[k] - plain[k]).abs().max().item() for k in plain) > 1e-4  # other tokens, other gradients
    reloaded = vlmcompress.load(tmp_path / "dropped")
    adapter = [a for a in ADAPTERS if a.family == "clip"][0]
    inputs = adapter.example_inputs(reloaded, batch_size=2)
    with torch.no_grad():
        a, b = adapter.main_outputs(dropped.eval(), inputs), adapter.main_outputs(reloaded, inputs)
    assert torch.allclose(a["image_embeds"], b["image_embeds"], atol=1e-6)


@pytest.mark.parametrize("model,stages,fragments", [
    ("shapes-llava-small", [{"method": "finetune", "train": {"steps": 2, "patch_dropout": 0.5}}],
     ["finetune.train.patch_dropout: 0.5", "llava", "set patch_dropout: 0"]),
    ("shapes-clip-small", [{"method": "token_reduce", "algorithm": "tome", "r": 4},
                           {"method": "finetune", "train": {"steps": 2, "patch_dropout": 0.5}}],
     ["stages[1] (finetune).train.patch_dropout", "token reduction runs before it"]),
    ("shapes-clip-small", [{"method": "distill", "student": {"vision": 1}, "train": {"steps": 2, "patch_dropout": 0.5}}],
     ["distill.train.patch_dropout", "loss.hidden"]),
    ("shapes-clip-small", [{"method": "finetune", "train": {"steps": 2, "patch_dropout": 1.0}}],
     ["patch_dropout", "less than 1"]),
])
def test_refused_recipes_are_one_line_and_write_nothing(tmp_path, model, stages, fragments):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path / "out", stages, model)))
    for command in ("validate", "apply"):
        result = runner.invoke(app, [command, str(path)])
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
        for fragment in fragments:
            assert fragment in result.output, (fragment, result.output)
    assert not (tmp_path / "out").exists()


def test_gradient_checkpointing_replays_the_same_dropped_patches(tmp_path):
    # recomputing a layer in backward runs the hook again; torch's checkpoint restores the random state first, so
    # the replay keeps the same patches and the weights match a run without checkpointing exactly
    def run(name, checkpointing):
        finetune = {"method": "finetune", "train": {"steps": 3, "batch_size": 8, "lr": 1e-3, "patch_dropout": 0.5,
                                                    "gradient_checkpointing": checkpointing}}
        vlmcompress.apply(recipe(tmp_path / name, [finetune]), progress=False)
        return load_file(str(tmp_path / name / "model.safetensors"))

    plain, recomputed = run("plain", False), run("recomputed", True)
    assert max((plain[k] - recomputed[k]).abs().max().item() for k in plain) < 1e-6
