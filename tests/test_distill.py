"""Stage `distill`: student layer selection copies exactly the chosen teacher tensors, each loss term is zero for a
student equal to the teacher and positive otherwise, a few steps lower the loss, the student reloads in a fresh
process with stock transformers, and bad input is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import vlmcompress
from vlmcompress.adapters import BUILTIN_TINY
from vlmcompress.cli import app
from vlmcompress.stages.distill.student import attention_map, evenly_spaced, hidden_map, keep_layers
from vlmcompress.train.losses import attention_mse, embedding_distance, hidden_mse

runner = CliRunner()


def test_layer_maps_by_hand():
    assert evenly_spaced(12, 6) == [0, 2, 4, 7, 9, 11] and evenly_spaced(4, 2) == [0, 3] and evenly_spaced(3, 1) == [0]
    assert hidden_map(12, 6) == [0, 2, 4, 6, 8, 10, 12]  # EfficientVLM: student i ↔ teacher 2i
    assert hidden_map(4, 2) == [0, 2, 4] and attention_map(12, 6) == [1, 3, 5, 7, 9, 11]
    assert attention_map(4, 1) == [3]


@pytest.mark.parametrize("name", list(BUILTIN_TINY))
def test_selection_copies_exactly_the_chosen_teacher_layers(name):
    adapter = BUILTIN_TINY[name]
    teacher = adapter.tiny_model(0)
    student = adapter.tiny_model(0)
    for component, stack in adapter.layer_stacks(student).items():
        n = len(student.get_submodule(stack.layers_path))
        keep = [n - 1] if n > 1 and component != "qformer" else [0]
        keep_layers(student, stack, keep)
        kept = student.get_submodule(stack.layers_path)
        assert len(kept) == len(keep)
        for j, i in enumerate(keep):
            want = teacher.get_submodule(stack.layers_path)[i].state_dict()
            got = kept[j].state_dict()
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # everything outside the stacks is untouched
    stacks = [s.layers_path for s in adapter.layer_stacks(student).values()]
    outside = {k: v for k, v in teacher.state_dict().items() if not any(k.startswith(p + ".") for p in stacks)}
    assert all(torch.equal(student.state_dict()[k], v) for k, v in outside.items())


def test_hidden_and_attention_terms_are_zero_for_the_teacher_itself():
    a = [torch.randn(2, 5, 8) for _ in range(5)]
    assert hidden_mse([a[0], a[2], a[4]], a, [0, 2, 4]).item() == 0
    assert hidden_mse([a[0], a[1], a[4]], a, [0, 2, 4]).item() > 0
    maps = [torch.softmax(torch.randn(2, 4, 5, 5), -1) for _ in range(4)]
    assert attention_mse([maps[1], maps[3]], maps, [1, 3]).item() == 0
    assert attention_mse([maps[0], maps[3]], maps, [1, 3]).item() > 0
    # by hand: MSE of [0, 2] against [1, 1] = (1 + 1) / 2
    assert hidden_mse([torch.tensor([0.0, 2.0])], [torch.tensor([1.0, 1.0])], [0]).item() == 1.0


def test_embedding_term_by_hand():
    # unit rows: (1, 0) vs (0, 1) are orthogonal, ‖ŝ − t̂‖² = 2; (3, 4) vs (6, 8) point the same way, 0
    student = {"image": torch.tensor([[1.0, 0.0], [3.0, 4.0]]), "text": torch.tensor([[0.0, -2.0]])}
    teacher = {"image": torch.tensor([[0.0, 5.0], [6.0, 8.0]]), "text": torch.tensor([[0.0, 2.0]])}
    # image: mean(2, 0) = 1; text: opposite directions, 4; mean over the two names = 2.5
    assert embedding_distance(student, teacher).item() == pytest.approx(2.5)
    same = {"image": torch.randn(4, 8)}
    assert embedding_distance(same, {"image": same["image"] * 3}).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="no embeddings"):
        embedding_distance({"image": same["image"]}, {"text": same["image"]})


def recipe(out: Path, student: dict, loss: dict | None = None, steps: int = 4) -> dict:
    stage = {"method": "distill", "student": student, "train": {"steps": steps, "batch_size": 8, "lr": 1e-3}}
    if loss is not None:
        stage["loss"] = loss
    return {"model": "shapes-clip-small", "output": str(out),
            "data": {"train": {"builtin": "shapes", "split": "train"},
                     "eval": {"builtin": "shapes", "split": "test", "size": 100}},
            "stages": [stage]}


CHILD = """
import sys
sys.modules["vlmcompress"] = None
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert len(model.vision_model.encoder.layers) == int(sys.argv[4])
inputs = load_file(sys.argv[2])
with torch.no_grad():
    out = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
save_file({"image": out.contiguous()}, sys.argv[3])
"""


def test_a_distilled_student_trains_and_reloads_with_stock_transformers(tmp_path):
    out = tmp_path / "out"
    model = vlmcompress.apply(recipe(out, {"vision": [1]},
                                     {"task": 1.0, "logits": 1.0, "hidden": 1.0, "attention": 1.0}, steps=6),
                              progress=False)
    report = model.vlmcompress_report
    details = report["stages"][0]["details"]
    assert details["student"]["vision"] == {"teacher_layers": [1], "layers": 1, "of": 2}
    assert report["params_after"] < report["params_before"] and details["loss_last"] < details["loss_first"]
    config = model.config
    assert config.vision_config.num_hidden_layers == 1 and config.text_config.num_hidden_layers == 1  # text: 1 already
    pixels = torch.randn(2, 3, config.vision_config.image_size, config.vision_config.image_size)
    save_file({"pixel_values": pixels}, str(tmp_path / "in.safetensors"))
    with torch.no_grad():
        want = model.get_image_features(pixel_values=pixels).pooler_output
    subprocess.run([sys.executable, "-c", CHILD, str(out), str(tmp_path / "in.safetensors"),
                    str(tmp_path / "got.safetensors"), "1"], check=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    torch.testing.assert_close(load_file(str(tmp_path / "got.safetensors"))["image"], want, atol=1e-5, rtol=1e-5)
    again = vlmcompress.load(out)
    with torch.no_grad():
        torch.testing.assert_close(again.get_image_features(pixel_values=pixels).pooler_output, want)


def test_lr_scale_sets_a_components_learning_rate(tmp_path):
    """text at 1e-6 × lr barely moves while vision, at lr, moves: the multiplier reaches the optimizer."""
    from vlmcompress.models import load_model

    teacher = load_model("shapes-clip-small")[0]
    stage = recipe(tmp_path / "out", {"vision": [0, 1]}, steps=4)
    stage["stages"][0]["lr_scale"] = {"text": 1e-6}
    model = vlmcompress.apply(stage, progress=False)
    assert model.vlmcompress_report["stages"][0]["details"]["lr_scale"] == {"text": 1e-6}
    before, after = teacher.state_dict(), model.state_dict()

    def moved(prefix):
        return max((after[k] - before[k]).abs().max().item() for k in after if k.startswith(prefix))

    assert moved("text_model.") < 1e-5 < 1e-4 < moved("vision_model."), (moved("text_model."), moved("vision_model."))


@pytest.mark.parametrize("student,fragments", [
    ("{vision: [0, 5]}", ["distill.student.vision", "0 … 1"]),
    ("{vision: [0, 0]}", ["distill.student.vision", "distinct"]),
    ("{llm: 1}", ["distill.student.llm", "no llm layers", "vision, text"]),
    ("{vision: 3}", ["distill.student.vision", "3 layers asked", "the teacher has 2"]),
    ("{vision: 1}\n    loss: {embedding: 1}\n", ["distill.loss.embedding", "llava", "clip and siglip"]),
    ("{vision: 1}\n    lr_scale: {qformer: 2}\n", ["distill.lr_scale.qformer", "no qformer", "vision, text"]),
    ("{vision: 1}\n    lr_scale: {text: 0}\n", ["lr_scale {'text': 0.0} must be > 0"]),
])
def test_bad_students_are_one_line(tmp_path, student, fragments):
    path = tmp_path / "recipe.yaml"
    model = "shapes-llava" if "embedding" in student else "shapes-clip-small"
    path.write_text(f"model: {model}\noutput: {tmp_path / 'out'}\ndata:\n  train: {{builtin: shapes}}\n"
                    f"stages:\n  - method: distill\n    student: {student}\n    train: {{steps: 2}}\n")
    for command in (["validate", str(path)], ["apply", str(path)]):
        result = runner.invoke(app, command)
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
        for fragment in fragments:
            assert fragment in result.output, (fragment, result.output)
    assert not (tmp_path / "out").exists()


def test_the_dry_run_plan_shows_layers_maps_rates_and_parameters(tmp_path):
    import re

    from vlmcompress.models import load_model
    from vlmcompress.stages.base import count_params

    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: shapes-clip-small\noutput: {tmp_path / 'out'}\ndata:\n  train: {{builtin: shapes}}\n"
                    "stages:\n  - method: distill\n    student: {vision: 1}\n    lr_scale: {text: 3}\n"
                    "    train: {steps: 2, lr: 1.0e-3}\n")
    result = runner.invoke(app, ["apply", str(path), "--dry-run"], terminal_width=200)
    assert result.exit_code == 0, result.output
    teacher = load_model("shapes-clip-small")[0]
    dropped = sum(p.numel() for p in teacher.vision_model.encoder.layers[1].parameters())
    text = " ".join(result.output.split())
    assert "vision 1 of 2 layers: [0]" in text and "vision teacher hidden states [0, 2]" in text, text
    assert "lr: student 0.001, text 0.003" in text, text
    got = re.search(r"params: total ([\d,]+) → ([\d,]+)", text)
    assert got and [int(g.replace(",", "")) for g in got.groups()] == [count_params(teacher),
                                                                       count_params(teacher) - dropped], text
    assert not (tmp_path / "out").exists()


def test_distill_without_train_data_is_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: shapes-clip-small\noutput: {tmp_path / 'out'}\nstages:\n  - method: distill\n"
                    "    student: {vision: 1}\n    train: {steps: 2}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and "data.train" in result.output and "distill" in result.output


def test_a_student_its_config_would_not_rebuild_is_refused():
    from vlmcompress.errors import VlmCompressError
    from vlmcompress.stages.distill.stage import DistillConfig, DistillStage

    adapter = BUILTIN_TINY["tiny-blip2"]
    stage = DistillStage(DistillConfig(method="distill", student={"qformer": [1]}, train={"steps": 1}))
    with pytest.raises(VlmCompressError, match="would not rebuild"):
        stage.check(adapter.tiny_model(0), adapter)  # layer 1 has no cross-attention; a first layer must


STUDENTS = {"tiny-clip": {"vision": 1, "text": [1]}, "tiny-siglip": {"vision": [1]},
            "tiny-blip": {"vision": 1, "text": 1}, "tiny-blip2": {"vision": 1, "llm": [1]},
            "tiny-llava": {"vision": [1], "llm": 1}}


@pytest.mark.parametrize("name", list(STUDENTS))
def test_a_few_distillation_steps_lower_the_loss_on_every_family(name, monkeypatch):
    from types import SimpleNamespace

    from vlmcompress.stages.distill.stage import DistillConfig, DistillStage
    from vlmcompress.train.config import TrainConfig
    from vlmcompress.train.trainer import ParamGroup, Trainer

    adapter = type(BUILTIN_TINY[name])()
    torch.manual_seed(0)
    teacher = adapter.tiny_model(0).requires_grad_(False)
    model = adapter.tiny_model(0)
    batch = adapter.example_inputs(model, batch_size=4, seed=1)
    adapter.collate = lambda processor, rows: batch  # a fixed batch of the tiny model's inputs
    stage = DistillStage(DistillConfig(method="distill", student=STUDENTS[name], train={"steps": 1},
                                       loss={"task": 1.0, "logits": 1.0, "hidden": 1.0}))
    keep = stage.keep(model, adapter)
    maps = stage.maps(model, adapter, keep)
    stacks = adapter.layer_stacks(model)
    for component, kept in keep.items():
        keep_layers(model, stacks[component], kept)
    ctx = SimpleNamespace(adapter=adapter, processor=None, teacher=teacher, rows=lambda split: (lambda s, n: [{}] * n),
                          train_size=lambda: None, work=None, stage_index=0, recipe=None, artifacts={})
    loss_fn = stage._loss_fn(ctx, stacks, keep, maps, {c: [0] * len(k) for c, k in keep.items()})
    with torch.no_grad():
        before = loss_fn(model.eval(), None)
    assert set(before.terms) == {"task", "logits", "hidden"} and before.terms["hidden"] > 0
    Trainer(ctx, TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup=0), name=name, model=model, loss_fn=loss_fn,
            param_groups=[ParamGroup("all", dict(model.named_parameters()))], progress=False).fit()
    with torch.no_grad():
        after = loss_fn(model.eval(), None)
    assert float(after.total) < float(before.total) * 0.95, (before.terms, after.terms)


def test_every_distillation_term_is_zero_for_a_student_equal_to_the_teacher():
    from types import SimpleNamespace

    from vlmcompress.stages.distill.stage import DistillConfig, DistillStage

    adapter = type(BUILTIN_TINY["tiny-clip"])()
    teacher, student = adapter.tiny_model(0), adapter.tiny_model(0)
    for m in (teacher, student):
        m.set_attn_implementation("eager")
    batch = adapter.example_inputs(student, batch_size=3)
    adapter.collate = lambda processor, rows: batch
    stage = DistillStage(DistillConfig(method="distill", student={"vision": 2, "text": 2}, train={"steps": 1},
                                       loss={"task": 0.0, "logits": 1.0, "hidden": 1.0, "attention": 1.0,
                                             "embedding": 1.0}))
    keep = stage.keep(student, adapter)
    assert keep == {"vision": [0, 1], "text": [0, 1]}
    ctx = SimpleNamespace(adapter=adapter, processor=None, teacher=teacher)
    stacks = adapter.layer_stacks(student)
    loss_fn = stage._loss_fn(ctx, stacks, keep, stage.maps(student, adapter, keep), {"vision": [0, 1], "text": [0, 1]})
    with torch.no_grad():
        same = loss_fn(student, None).terms
        assert set(same) == {"logits", "hidden", "attention", "embedding"}, same
        assert all(float(v) == 0 for v in same.values()), same
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        moved = loss_fn(student, None).terms
    assert all(float(v) > 0 for v in moved.values()), moved
