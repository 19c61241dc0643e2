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


def test_llava_vqa_accuracy_is_measured_in_apply(tmp_path):
    """LLaVA: exact-match VQA on the recipe's data.eval before and after every stage (issue 17, point 5), the same
    number `answer_questions` gives on the same rows."""
    from vlmcompress.evaluate import answer_questions
    from vlmcompress.models import load_model

    eval_data = {"builtin": "shapes", "split": "test", "size": 40}
    model = vlmcompress.apply({"model": "shapes-llava", "output": str(tmp_path / "out"),
                               "data": {"eval": eval_data},
                               "stages": [{"method": "token_reduce", "algorithm": "fastv", "layer": 1,
                                           "keep_ratio": 0.5}]}, progress=False)
    accuracy = model.vlmcompress_report["accuracy"]
    base, processor = load_model("shapes-llava")
    from vlmcompress.data import load_rows
    from vlmcompress.data.schema import DataSource

    rows = load_rows(DataSource(**eval_data), base)
    for key, m in (("before", base), ("after", model)):
        answers = answer_questions(m, processor, [r["image"] for r in rows], [r["question"] for r in rows])
        assert accuracy[key]["vqa_accuracy"] == round(sum(a == r["answer"] for a, r in zip(answers, rows)) / 40, 4)
    assert 0 < accuracy["before"]["vqa_accuracy"] <= 1


def test_a_family_apply_cannot_measure_says_so_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from vlmcompress.cli import app

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: tiny-blip2\noutput: {tmp_path / 'out'}\ndata:\n  eval: {{builtin: shapes, split: test, "
                      "size: 8}\nstages:\n  - method: token_reduce\n    r: 2\n")
    result = CliRunner().invoke(app, ["apply", str(recipe)])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines() if "accuracy not measured" in line]
    assert len(lines) == 1 and "no saved processor" in lines[0], result.output
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["accuracy_not_measured"] == lines[0]
