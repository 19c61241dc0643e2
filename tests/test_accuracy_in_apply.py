"""`apply` measures accuracy on the recipe's data.eval before and after each stage, and enforces guards."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlmcompress  # noqa: E402
from vlmcompress.accuracy import GuardError  # noqa: E402

EVAL = {"eval": {"builtin": "shapes", "split": "test", "size": 1000}}


def test_report_and_card_carry_accuracy_before_and_after(tmp_path):
    recipe = {"model": "shapes-clip-small", "output": str(tmp_path / "out"), "data": EVAL,
              "stages": [{"method": "structured_prune", "ratio": 0.3}, {"method": "token_reduce", "r": 16}]}
    model = vlmcompress.apply(recipe, progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    before, after = report["accuracy"]["before"], report["accuracy"]["after"]
    assert before["recall@1"] > 0.1  # the shipped teacher is far above chance (0.001)
    assert before["recall@1"] != after["recall@1"]  # compression changed the model's retrieval
    stages = report["stages"]
    assert stages[0]["details"]["accuracy"]["before"] == before
    assert stages[1]["details"]["accuracy"]["before"] == stages[0]["details"]["accuracy"]["after"]
    assert stages[1]["details"]["accuracy"]["after"] == after
    assert model.vlmcompress_report["accuracy"]["after"] == after
    speed = report["speed"]
    assert speed["before"]["ms_median"] > 0 and speed["after"]["ms_median"] > 0
    # pruning 30 % and merging 16 tokens per layer must cut the image encoder's FLOPs (deterministic, unlike time)
    assert speed["flops_reduction"] > 1.3
    before_gflops, after_gflops = speed["before"]["gflops_per_sample"], speed["after"]["gflops_per_sample"]
    assert speed["flops_reduction"] == round(before_gflops / after_gflops, 3)
    assert stages[1]["details"]["speed"]["before"] == stages[0]["details"]["speed"]["after"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "GFLOPs per sample" in card
    assert f"| recall@1 | {before['recall@1']:.4f} | {after['recall@1']:.4f} |" in card


def test_guard_stops_without_output_and_keeps_stage_results(tmp_path):
    recipe = {"model": "shapes-clip-small", "output": str(tmp_path / "out"), "data": EVAL,
              "guards": {"max_drop": {"recall@1": 1.0}},
              "stages": [{"method": "structured_prune", "ratio": 0.7}, {"method": "token_reduce", "r": 8}]}
    with pytest.raises(GuardError, match=r"recall@1 fell .* points"):
        vlmcompress.apply(recipe, progress=False)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "out.vlmcompress-work" / "stage-01" / "config.json").is_file()


def test_guard_without_eval_data_is_an_error(tmp_path):
    recipe = {"model": "shapes-clip-small", "output": str(tmp_path / "out"), "guards": {"max_drop": {"recall@1": 1}},
              "stages": [{"method": "token_reduce", "r": 8}]}
    with pytest.raises(GuardError, match="data.eval"):
        vlmcompress.apply(recipe, progress=False)
    assert not (tmp_path / "out").exists()
