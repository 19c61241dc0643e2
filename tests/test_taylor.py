"""`importance: taylor`: |w · ∂L/∂w| of the family's task loss on data.train decides what is pruned."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlmcompress  # noqa: E402
from vlmcompress.adapters import adapter_for  # noqa: E402
from vlmcompress.data import load_rows  # noqa: E402
from vlmcompress.errors import StageOrderError  # noqa: E402
from vlmcompress.models import load_model  # noqa: E402
from vlmcompress.recipe import DataSource  # noqa: E402
from vlmcompress.stages.structured_prune import head_importance, neuron_importance  # noqa: E402

TRAIN = {"train": {"builtin": "shapes", "split": "train", "size": 64}}


def test_taylor_scores_are_weight_times_gradient():
    model, processor = load_model("shapes-clip-small")
    adapter = adapter_for(model)
    rows = load_rows(DataSource(builtin="shapes", split="train", size=32), model)
    adapter.task_loss(model, processor, rows).backward()
    unit = adapter.attention_units(model)[0]
    d = unit.head_dim
    expected = []
    for h in range(unit.num_heads):
        rows_ = slice(h * d, (h + 1) * d)
        s = sum((lin.weight[rows_] * lin.weight.grad[rows_]).abs().sum()
                + (lin.bias[rows_] * lin.bias.grad[rows_]).abs().sum()
                for lin in (unit.module.q_proj, unit.module.k_proj, unit.module.v_proj))
        s += (unit.module.out_proj.weight[:, rows_] * unit.module.out_proj.weight.grad[:, rows_]).abs().sum()
        expected.append(float(s.detach()))
    assert torch.allclose(head_importance(unit, "taylor"), torch.tensor(expected), rtol=1e-5)
    mlp = adapter.mlp_units(model)[0]
    fc1, fc2 = mlp.module.fc1, mlp.module.fc2
    manual = ((fc1.weight * fc1.weight.grad).abs().sum(1) + (fc1.bias * fc1.bias.grad).abs()
              + (fc2.weight * fc2.weight.grad).abs().sum(0))
    assert torch.allclose(neuron_importance(mlp, "taylor"), manual, rtol=1e-5)
    # magnitude ignores gradients: it must rank differently from taylor somewhere in the model
    assert not torch.equal(neuron_importance(mlp, "taylor").argsort(), neuron_importance(mlp, "magnitude").argsort())


def test_taylor_recipe_prunes_and_reloads(tmp_path):
    recipe = {"model": "shapes-clip-small", "output": str(tmp_path / "out"), "data": TRAIN,
              "stages": [{"method": "structured_prune", "importance": "taylor", "ratio": {"vision": 0.5},
                          "calibration_batches": 2}]}
    model = vlmcompress.apply(recipe, progress=False)
    assert all(p.grad is None for p in model.parameters())  # gradients are not left behind
    magnitude = vlmcompress.apply(recipe | {"stages": [{"method": "structured_prune", "ratio": {"vision": 0.5}}]},
                                  save=False, progress=False)
    taylor_fc1 = [layer.mlp.fc1.weight for layer in model.vision_model.encoder.layers]
    magnitude_fc1 = [layer.mlp.fc1.weight for layer in magnitude.vision_model.encoder.layers]
    assert sum(w.shape[0] for w in taylor_fc1) == sum(w.shape[0] for w in magnitude_fc1)  # same budget
    # ... spent on a different choice of neurons (per-layer widths or the rows kept differ)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(taylor_fc1, magnitude_fc1))
    loaded = vlmcompress.load(tmp_path / "out")
    assert {n: p.shape for n, p in loaded.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}


def test_taylor_without_training_data_fails_before_running(tmp_path):
    recipe = {"model": "shapes-clip-small", "output": str(tmp_path / "out"),
              "stages": [{"method": "structured_prune", "importance": "taylor", "ratio": 0.3}]}
    with pytest.raises(StageOrderError, match="data.train"):
        vlmcompress.apply(recipe, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.vlmcompress-work").exists()


def test_taylor_on_llava(tmp_path):
    recipe = {"model": "shapes-llava-small", "output": str(tmp_path / "out"), "data": TRAIN,
              "stages": [{"method": "structured_prune", "importance": "taylor", "ratio": {"llm": 0.5},
                          "calibration_batches": 1, "calibration_batch_size": 16}]}
    model = vlmcompress.apply(recipe, save=False, progress=False)
    assert model.model.language_model.layers[0].mlp.down_proj.in_features == 48
