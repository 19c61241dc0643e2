"""Stage checkpoints, resume after a crash, and output-folder protection (tiny-clip, prune → token_reduce)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import vlmcompress
from vlmcompress.adapters import BUILTIN_TINY
from vlmcompress.errors import OutputError
from vlmcompress.orchestrator import STAGE_META, work_dir_for
from vlmcompress.recipe import load_recipe
from vlmcompress.stages.structured_prune import StructuredPruneStage
from vlmcompress.stages.token_reduce import TokenReduceStage


class Crash(RuntimeError):
    pass


def recipe(output, ratio=0.5):
    return {"model": "tiny-clip", "output": str(output),
            "stages": [{"method": "structured_prune", "ratio": ratio}, {"method": "token_reduce", "r": 8}]}


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        assert torch.equal(wa[k], wb[k]), k


def config(folder):
    return json.loads((folder / "config.json").read_text())


def crash_in_token_reduce(monkeypatch):
    def boom(self, ctx):
        raise Crash("simulated crash in stage 2")

    monkeypatch.setattr(TokenReduceStage, "run", boom)


def spy_prune(monkeypatch):
    calls = []
    original = StructuredPruneStage.run

    def run(self, ctx):
        calls.append(self.config.ratio)
        return original(self, ctx)

    monkeypatch.setattr(StructuredPruneStage, "run", run)
    return calls


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs into their own folders, per prune ratio."""
    out = {}
    for ratio in (0.5, 0.25):
        folder = tmp_path_factory.mktemp("reference") / f"ratio-{ratio}"
        vlmcompress.apply(recipe(folder, ratio), progress=False)
        out[ratio] = folder
    return out


def crash_after_stage_1(out, monkeypatch):
    with monkeypatch.context() as m:
        crash_in_token_reduce(m)
        with pytest.raises(Crash):
            vlmcompress.apply(recipe(out), progress=False)


def test_crash_leaves_stage_checkpoint_and_no_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_after_stage_1(out, monkeypatch)
    assert not out.exists()
    work = work_dir_for(out)
    assert work == tmp_path / "out.vlmcompress-work"
    assert sorted(p.name for p in work.iterdir()) == ["stage-01"]
    meta = json.loads((work / "stage-01" / STAGE_META).read_text())
    assert meta["stage"] == 1
    assert meta["method"] == "structured_prune"
    assert meta["prefix_hash"] == load_recipe(recipe(out)).prefix_hash(1)
    assert [r["method"] for r in meta["reports"]] == ["structured_prune"]
    # the stage checkpoint holds the pruned model, loadable on its own
    stage_model = vlmcompress.load(work / "stage-01")
    base = sum(p.numel() for p in BUILTIN_TINY["tiny-clip"].tiny_model(0).parameters())
    assert meta["params_before_recipe"] == base
    assert sum(p.numel() for p in stage_model.parameters()) < base
    assert not stage_model.config.token_reduction


def test_resume_skips_finished_stage_and_matches_uninterrupted_run(tmp_path, monkeypatch, reference):
    out = tmp_path / "out"
    crash_after_stage_1(out, monkeypatch)

    def prune_must_not_run(self, ctx):
        raise AssertionError("structured_prune ran again although stage-01 matches the recipe")

    monkeypatch.setattr(StructuredPruneStage, "run", prune_must_not_run)
    model = vlmcompress.apply(recipe(out), resume=True, progress=False)

    assert (out / "config.json").is_file()
    assert not work_dir_for(out).exists()
    assert_same_weights(out, reference[0.5])
    got, want = config(out), config(reference[0.5])
    assert got["token_reduction"] == want["token_reduction"]
    assert got["vlmcompress"]["param_shapes"] == want["vlmcompress"]["param_shapes"]
    assert got["vlmcompress"]["module_attrs"] == want["vlmcompress"]["module_attrs"]
    report = model.vlmcompress_report
    want_report = json.loads((reference[0.5] / "report.json").read_text())
    assert [s["method"] for s in report["stages"]] == ["structured_prune", "token_reduce"]
    for key in ("params_before", "params_after", "tokens_per_layer"):
        assert report[key] == want_report[key], key


def test_changed_stage_1_ratio_invalidates_resume_point(tmp_path, monkeypatch, reference):
    out = tmp_path / "out"
    crash_after_stage_1(out, monkeypatch)
    calls = spy_prune(monkeypatch)
    vlmcompress.apply(recipe(out, ratio=0.25), resume=True, progress=False)
    assert calls == [0.25]
    assert not work_dir_for(out).exists()
    assert_same_weights(out, reference[0.25])
    w_new, w_old = weights(out), weights(reference[0.5])
    assert any(w_new[k].shape != w_old[k].shape for k in w_new)


def test_fresh_run_discards_stale_work_folder(tmp_path, monkeypatch):
    """Without resume=True a stale work folder is discarded and every stage runs."""
    out = tmp_path / "out"
    crash_after_stage_1(out, monkeypatch)
    calls = spy_prune(monkeypatch)
    vlmcompress.apply(recipe(out), progress=False)
    assert calls == [0.5]
    assert not work_dir_for(out).exists()


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputError, match="already exists"):
        vlmcompress.apply(recipe(out), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "user data"
    assert not work_dir_for(out).exists()

    with pytest.raises(OutputError, match="holds files vlmcompress did not write"):  # not even with --overwrite
        vlmcompress.apply(recipe(out), overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()  # an empty folder may be overwritten
    vlmcompress.apply(recipe(out), overwrite=True, progress=False)
    names = {p.name for p in out.iterdir()}
    assert "keep.txt" not in names
    assert {"config.json", "model.safetensors", "recipe.yaml", "report.json"} <= names
    assert config(out)["token_reduction"]["towers"][0]["tokens_per_layer"] == [57, 49]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp / old folders left behind
