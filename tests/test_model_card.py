"""The model card (issue 20, point 2): built with huggingface_hub's ModelCardData, parsed back by ModelCard.load,
with `base_model` only for Hub ids, `base_model_relation` by what the stages did, the family's `pipeline_tag`, and
`model-index` results that name their dataset."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

import vlmcompress
from vlmcompress.model_card import PIPELINE_TAGS, base_model_relation, hub_base_model, model_card
from vlmcompress.recipe import load_recipe

# Allowed values, copied with their source:
# - base_model_relation: huggingface_hub ModelCardData docs / the Hub's model-card spec ("adapter", "merge",
#   "quantized", "finetune"); https://huggingface.co/docs/hub/model-cards#specifying-a-base-model
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
# - pipeline tags: @huggingface/tasks `PIPELINE_DATA` (packages/tasks/src/pipelines.ts), the multimodal ones
PIPELINE_TAGS_ALLOWED = {"zero-shot-image-classification", "image-text-to-text", "image-to-text",
                         "visual-question-answering", "feature-extraction", "image-feature-extraction"}


def test_relation_follows_what_changed_the_weights():
    assert base_model_relation(["quantize"]) == "quantized"
    assert base_model_relation(["token_reduce", "quantize"]) == "quantized"  # token reduction keeps the weights
    assert base_model_relation(["structured_prune", "quantize"]) is None
    assert base_model_relation(["structured_prune", "finetune"]) == "finetune"
    assert base_model_relation(["distill"]) == "finetune"
    assert base_model_relation(["token_reduce"]) is None
    assert set(PIPELINE_TAGS.values()) <= PIPELINE_TAGS_ALLOWED


def test_base_model_only_for_hub_ids():
    assert hub_base_model("openai/clip-vit-base-patch32", local_source=False) == "openai/clip-vit-base-patch32"
    assert hub_base_model("shapes-clip", local_source=False) is None  # a built-in name
    assert hub_base_model("my-clip", local_source=True) is None  # a local folder
    assert hub_base_model("bad//id", local_source=False) is None
    assert hub_base_model("my-clip", local_source=True, given="org/base") == "org/base"  # push --base-model


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "out"
    recipe = {"model": "shapes-clip-small", "output": str(out),
              "data": {"eval": {"builtin": "shapes", "split": "test", "size": 64}},
              "stages": [{"method": "token_reduce", "r": 2}, {"method": "quantize"}]}
    model = vlmcompress.apply(recipe, progress=False)
    return out, model


def test_card_round_trips_through_huggingface_hub(output):
    out, model = output
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "zero-shot-image-classification"
    assert "base_model" not in data and "base_model_relation" not in data  # a built-in source
    assert {"vlmcompress", "token_reduce", "quantize", "tome"} <= set(data["tags"])
    results = card.data.eval_results
    after = model.vlmcompress_report["accuracy"]["after"]
    assert {r.metric_type: r.metric_value for r in results} == {k: round(v, 4) for k, v in after.items()}
    assert all(r.dataset_type == "shapes" and r.dataset_split == "test" and r.task_type == "image-text-retrieval"
               for r in results)
    text = card.text
    for section in ("## Results", "## Quantization", "## Recipe", "## How to load", "## Limitations",
                    "## Library versions"):
        assert section in text, section
    assert 'pipeline("zero-shot-image-classification"' in text and "vlmcompress.load" in text
    assert "ms per batch" in text and "CPU" in text  # the speed row names the machine


def test_card_of_a_hub_source_names_base_model_and_relation(output):
    _, model = output
    recipe = load_recipe({"model": "openai/clip-vit-base-patch32", "output": "clip-int8",
                          "stages": [{"method": "token_reduce", "r": 2}, {"method": "quantize"}]})
    card = ModelCard(model_card(recipe, model.vlmcompress_report, model))
    reparsed = ModelCard(str(card))  # what the Hub parses
    assert reparsed.data.base_model == "openai/clip-vit-base-patch32"
    assert reparsed.data.to_dict()["base_model_relation"] == "quantized" in BASE_MODEL_RELATIONS
