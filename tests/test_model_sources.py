"""`model:` resolution: a local save_pretrained folder (with its processor) works like a built-in name."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlmcompress  # noqa: E402
from vlmcompress.adapters import BUILTIN_TINY  # noqa: E402
from vlmcompress.errors import ModelLoadError  # noqa: E402
from vlmcompress.models import load_model  # noqa: E402


def test_local_folder_with_processor_round_trips(tmp_path):
    adapter = BUILTIN_TINY["tiny-llava"]
    source = tmp_path / "llava-src"
    base = adapter.tiny_model()
    base.save_pretrained(source)
    adapter.tiny_processor().save_pretrained(source)
    model, processor = load_model(str(source))
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor is not None
    recipe = {"model": str(source), "output": str(tmp_path / "out"), "dtype": "float32",
              "stages": [{"method": "structured_prune", "ratio": {"llm": 0.5}}, {"method": "token_reduce", "r": 8}]}
    compressed = vlmcompress.apply(recipe, progress=False)
    out = tmp_path / "out"
    assert (out / "processor_config.json").is_file() and (out / "tokenizer.json").is_file()
    from transformers import AutoModelForImageTextToText

    task_model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    inputs = adapter.example_inputs(base)
    with torch.no_grad():
        expected = compressed(**inputs).logits
        got = task_model(**inputs).logits
        original = base(**inputs).logits
    assert type(task_model).__name__ == "VlmcLlavaForConditionalGeneration"
    assert torch.allclose(got, expected, atol=1e-5)
    assert got.shape[1] < original.shape[1]  # fewer image tokens reached the language model
    # the source folder is untouched
    assert load_model(str(source))[0].config.model_type == "llava"


def test_recipe_dtype_is_honoured(tmp_path):
    model, _ = load_model("tiny-clip", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_compressed_checkpoint_is_a_valid_source(tmp_path):
    """A compressed folder can be compressed further (its record is carried over)."""
    first = vlmcompress.apply({"model": "tiny-clip", "output": str(tmp_path / "a"),
                               "stages": [{"method": "structured_prune", "ratio": 0.5}]}, progress=False)
    second = vlmcompress.apply({"model": str(tmp_path / "a"), "output": str(tmp_path / "b"),
                                "stages": [{"method": "token_reduce", "r": 8}]}, progress=False)
    assert sum(p.numel() for p in second.parameters()) == sum(p.numel() for p in first.parameters())
    loaded = vlmcompress.load(tmp_path / "b")
    assert loaded.config.token_reduction["towers"][0]["tokens_per_layer"] == [57, 49]
    assert {n: p.shape for n, p in loaded.named_parameters()} == {n: p.shape for n, p in first.named_parameters()}


def test_hub_id_failure_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        load_model("nonexistent-org/nonexistent-model")
    except ModelLoadError as e:
        assert "nonexistent-org/nonexistent-model" in str(e) and "Hub id" in str(e)
    else:
        raise AssertionError("expected ModelLoadError")
