"""The shipped teachers verify, load by name, reach their documented scores, and survive compression round trips."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlmcompress  # noqa: E402
from vlmcompress import zoo  # noqa: E402
from vlmcompress.evaluate import evaluate_dual_encoder, evaluate_vqa, shapes_eval_rows  # noqa: E402
from vlmcompress.models import load_model  # noqa: E402


@pytest.mark.parametrize("name", ["shapes-clip", "shapes-clip-small", "shapes-llava", "shapes-llava-small"])
def test_shipped_weights_verify(name):
    assert zoo.verify(zoo.ZOO_DIR / name), f"shipped {name} is missing or does not match its manifest"


def test_shapes_clip_scores():
    model, processor = load_model("shapes-clip")
    result = evaluate_dual_encoder(model, processor, size=1000)
    # documented target: image→text R@1 >= 0.70 and not saturated (<= 0.97)
    assert 0.70 <= result["i2t_R@1"] <= 0.97 and result["t2i_R@1"] >= 0.70
    assert result["chance_R@1"] < 0.01 and result["zero_shot_shape"] > 3 * result["zero_shot_chance"]


def test_shapes_llava_scores():
    model, processor = load_model("shapes-llava")
    result = evaluate_vqa(model, processor, size=600)
    # documented target: exact match >= 0.60 and >= 30 points above the no-image baseline
    assert result["vqa_accuracy"] >= 0.60
    assert result["vqa_accuracy"] - result["no_image_accuracy"] >= 0.30
    assert result["majority_accuracy"] < 0.35


def test_compressed_llava_scores_the_same_through_every_loader(tmp_path):
    from transformers import AutoModel

    recipe = {"model": "shapes-llava-small", "output": str(tmp_path / "out"),
              "stages": [{"method": "token_reduce", "r": 8}]}
    in_memory = vlmcompress.apply(recipe, progress=False)
    _, processor = load_model(str(tmp_path / "out"))
    rows = shapes_eval_rows(in_memory, 120)
    expected = evaluate_vqa(in_memory, processor, rows)
    assert evaluate_vqa(vlmcompress.load(tmp_path / "out"), processor, rows) == expected
    remote = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert evaluate_vqa(remote, processor, rows) == expected
