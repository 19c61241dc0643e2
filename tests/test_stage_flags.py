"""Every stage flag is read by the orchestrator: requires_data, trains, needs_teacher, changes_architecture and
must_be_last each change what `apply` does (one test per flag, on toy stages registered for the test), and the run
context gives stages data (`ctx.batches`) and the teacher (`ctx.teacher`)."""

from __future__ import annotations

import os
from typing import ClassVar, Literal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlmcompress  # noqa: E402
from vlmcompress import orchestrator, registry  # noqa: E402
from vlmcompress.errors import StageOrderError, VlmCompressError  # noqa: E402
from vlmcompress.recipe import list_methods  # noqa: E402
from vlmcompress.stages.base import Stage, StageConfig, StageReport  # noqa: E402

WEIGHT = "vision_model.encoder.layers.0.mlp.fc1.weight"


class ProbeConfig(StageConfig):
    method: Literal["probe"]
    action: Literal["look", "zero", "shrink", "teacher", "data"] = "look"


class ProbeStage(Stage):
    """A test stage that records what it saw and, by `action`, changes the model."""

    seen: ClassVar[list] = []

    def run(self, ctx):
        action = self.config.action
        seen = {"training": ctx.model.training, "grad": torch.is_grad_enabled()}
        if action == "zero":
            with torch.no_grad():
                ctx.model.get_parameter(WEIGHT).zero_()
        elif action == "shrink":
            fc1 = ctx.model.get_submodule(WEIGHT.rpartition(".")[0])
            fc1.weight = torch.nn.Parameter(fc1.weight[:-1].detach().clone())
        elif action == "teacher":
            teacher = ctx.teacher
            seen |= {"teacher": teacher.get_parameter(WEIGHT).detach().clone(), "teacher_training": teacher.training,
                     "teacher_grads": any(p.requires_grad for p in teacher.parameters()),
                     "same_object": teacher is ctx.model}
        elif action == "data":
            seen["batches"] = [len(rows) for rows in ctx.batches("train", 10, 4)]
            seen["first"] = next(ctx.batches("train", 10, 4))[0]["text"]
        ProbeStage.seen.append(seen)
        n = sum(p.numel() for p in ctx.model.parameters())
        return StageReport(method="probe", params_before=n, params_after=n)


def _variant(name: str, **flags):
    return type(name, (ProbeStage,), dict(flags))


@pytest.fixture
def probe(request):
    """Register `probe` with the stage class the test asks for (default: no flags)."""
    list_methods()
    before = dict(registry._METHODS)
    stage_cls = getattr(request, "param", ProbeStage)
    ProbeStage.seen = []
    registry.register_method("probe", ProbeConfig, stage_cls)
    yield stage_cls
    registry._METHODS.pop("probe", None)
    assert registry._METHODS == before


def _recipe(tmp_path, *stages, data=False):
    recipe = {"model": "tiny-clip", "output": str(tmp_path / "out"), "stages": list(stages)}
    if data:
        recipe["data"] = {"train": {"builtin": "shapes", "split": "train", "size": 32}}
    return recipe


@pytest.mark.parametrize("probe", [_variant("DataStage", requires_data=True)], indirect=True)
def test_requires_data_is_checked_before_anything_runs(probe, tmp_path):
    with pytest.raises(StageOrderError, match=r"stages\[0\] \(probe\) needs training / calibration data"):
        vlmcompress.apply(_recipe(tmp_path, {"method": "probe"}), progress=False)
    assert ProbeStage.seen == [] and not (tmp_path / "out").exists()
    vlmcompress.apply(_recipe(tmp_path, {"method": "probe", "action": "data"}, data=True), save=False,
                      progress=False)
    first = ProbeStage.seen[0]
    assert first["batches"] == [4, 4, 2]  # 10 rows in batches of 4
    from vlmcompress.adapters import BUILTIN_TINY

    ctx = orchestrator.RunContext(model=BUILTIN_TINY["tiny-clip"].tiny_model(), adapter=None,
                                  recipe=vlmcompress.load_recipe(_recipe(tmp_path, {"method": "probe"}, data=True)))
    again = next(ctx.batches("train", 1, 1))  # seeded by the recipe: the same first row
    assert first["first"] == again[0]["text"]


@pytest.mark.parametrize("probe", [_variant("TrainingStage", trains=True)], indirect=True)
def test_trains_runs_in_train_mode_with_gradients_and_ends_in_eval(probe, tmp_path):
    with torch.no_grad():  # even a caller that turned gradients off
        model = vlmcompress.apply(_recipe(tmp_path, {"method": "probe"}), save=False, progress=False)
    assert ProbeStage.seen == [{"training": True, "grad": True}]
    assert not model.training


def test_a_stage_that_does_not_train_runs_as_given(probe, tmp_path):
    vlmcompress.apply(_recipe(tmp_path, {"method": "probe"}), save=False, progress=False)
    assert ProbeStage.seen == [{"training": False, "grad": True}]


@pytest.mark.parametrize("probe", [_variant("TeacherStage", needs_teacher=True)], indirect=True)
def test_needs_teacher_gets_the_frozen_source_model_lazily(probe, tmp_path, monkeypatch):
    from vlmcompress.adapters import BUILTIN_TINY

    source = BUILTIN_TINY["tiny-clip"].tiny_model().get_parameter(WEIGHT).detach().clone()
    loads = []
    real = orchestrator.load_model
    monkeypatch.setattr(orchestrator, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    # the first stage zeroes a weight; the teacher of the second still has the source's
    vlmcompress.apply(_recipe(tmp_path, {"method": "probe", "action": "zero"}, {"method": "probe", "action": "teacher"}),
                      save=False, progress=False)
    seen = ProbeStage.seen[1]
    assert torch.equal(seen["teacher"], source) and source.abs().sum() > 0
    assert not seen["teacher_training"] and not seen["teacher_grads"] and not seen["same_object"]
    assert len(loads) == 2  # the model, then the teacher when the second stage asked


def test_a_stage_without_needs_teacher_cannot_reach_it_and_nothing_is_loaded(probe, tmp_path, monkeypatch):
    loads = []
    real = orchestrator.load_model
    monkeypatch.setattr(orchestrator, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    with pytest.raises(VlmCompressError, match="without declaring needs_teacher"):
        vlmcompress.apply(_recipe(tmp_path, {"method": "probe", "action": "teacher"}), save=False, progress=False)
    assert len(loads) == 1  # only the model: a recipe without a teacher stage never holds a second copy


@pytest.mark.parametrize("probe", [_variant("TeacherStage", needs_teacher=True)], indirect=True)
def test_the_teacher_after_resume_is_the_source_model(probe, tmp_path, monkeypatch):
    from vlmcompress.adapters import BUILTIN_TINY

    source = BUILTIN_TINY["tiny-clip"].tiny_model().get_parameter(WEIGHT).detach().clone()
    recipe = _recipe(tmp_path, {"method": "probe", "action": "zero"}, {"method": "probe", "action": "teacher"})
    real = orchestrator._save_stage

    def crash_after_first(ctx, work, index, *args):
        real(ctx, work, index, *args)
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(orchestrator, "_save_stage", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        vlmcompress.apply(recipe, progress=False)
    monkeypatch.setattr(orchestrator, "_save_stage", real)
    ProbeStage.seen = []
    vlmcompress.apply(recipe, resume=True, progress=False)
    assert len(ProbeStage.seen) == 1  # only the second stage ran again
    assert torch.equal(ProbeStage.seen[0]["teacher"], source)


def test_changing_shapes_without_changes_architecture_is_an_error(probe, tmp_path):
    with pytest.raises(StageOrderError, match="changed parameter shapes .*fc1.weight.* changes_architecture"):
        vlmcompress.apply(_recipe(tmp_path, {"method": "probe", "action": "shrink"}), save=False, progress=False)


@pytest.mark.parametrize("probe", [_variant("ReshapingStage", changes_architecture=True)], indirect=True)
def test_changes_architecture_may_change_shapes(probe, tmp_path):
    model = vlmcompress.apply(_recipe(tmp_path, {"method": "probe", "action": "shrink"}), save=False,
                              progress=False)
    assert model.get_parameter(WEIGHT).shape[0] == 63  # tiny-clip's fc1 has 64 rows, one removed


@pytest.mark.parametrize("probe", [_variant("LastStage", must_be_last=True)], indirect=True)
def test_must_be_last_is_checked_before_anything_runs(probe, tmp_path):
    with pytest.raises(StageOrderError, match=r"stages\[0\] \(probe\) must be the last stage"):
        vlmcompress.apply(_recipe(tmp_path, {"method": "probe"}, {"method": "token_reduce", "r": 2}),
                          progress=False)
    assert ProbeStage.seen == []
    vlmcompress.apply(_recipe(tmp_path, {"method": "token_reduce", "r": 2}, {"method": "probe"}), save=False,
                      progress=False)
    assert len(ProbeStage.seen) == 1
