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


def _cache_as_hub_repo(folder, cache, repo_id: str, commit: str = "a" * 40):
    """Lay `folder` out in huggingface_hub's cache as repo `repo_id` at `main`, as a past download would have."""
    import shutil

    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    shutil.copytree(folder, storage / "snapshots" / commit)


def test_a_pushed_checkpoint_loads_by_its_hub_id_from_the_cache(tmp_path):
    """`vlmcompress.load`, `load_model` (so `model:` in a recipe) and `validate` take the Hub id of a compressed
    checkpoint: the compressed classes load it, never a stock class (which would drop the token reduction)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    vlmcompress.apply({"model": "tiny-clip", "output": str(out),
                       "stages": [{"method": "structured_prune", "ratio": 0.5}, {"method": "token_reduce", "r": 8}]},
                      progress=False)
    _cache_as_hub_repo(out, tmp_path / "cache", "me/tiny-clip-small")
    script = f"""
import json, torch, vlmcompress
from vlmcompress.adapters import BUILTIN_TINY
from vlmcompress.models import load_model
local = vlmcompress.load({str(out)!r})
by_id = vlmcompress.load("me/tiny-clip-small")
model, _ = load_model("me/tiny-clip-small")
meta, _ = load_model("me/tiny-clip-small", meta=True)
inputs = BUILTIN_TINY["tiny-clip"].example_inputs(local, batch_size=2)
with torch.no_grad():
    want = local(**inputs).logits_per_image
    print(json.dumps({{"types": [type(m).__name__ for m in (by_id, model, meta)],
                      "meta": all(p.is_meta for p in meta.parameters()),
                      "tokens": by_id.config.token_reduction["towers"][0]["tokens_per_layer"],
                      "diff": max(float((m(**inputs).logits_per_image - want).abs().max()) for m in (by_id, model))}}))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["types"] == ["VlmcCLIPModel"] * 3 and got["meta"]
    assert got["tokens"] == [57, 49] and got["diff"] == 0.0

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: me/tiny-clip-small\noutput: again\nstages:\n  - {method: token_reduce, r: 4}\n")
    check = subprocess.run([sys.executable, "-m", "vlmcompress", "validate", str(recipe)], capture_output=True,
                           text=True, env=env, cwd=tmp_path, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (tmp_path / "again").exists()
    missing = subprocess.run([sys.executable, "-c", "import vlmcompress; vlmcompress.load('me/not-cached')"],
                             capture_output=True, text=True, env=env, check=False)
    assert missing.returncode == 1 and "'me/not-cached' is not a local folder; could not read the config of Hub id " \
        "'me/not-cached' (not in the local cache, and the Hub was not reachable or HF_HUB_OFFLINE is set)" \
        in missing.stderr, missing.stderr[-500:]
    stock = tmp_path / "stock"
    BUILTIN_TINY["tiny-clip"].tiny_model(0).save_pretrained(stock)
    _cache_as_hub_repo(stock, tmp_path / "cache", "me/stock-clip")
    refused = subprocess.run([sys.executable, "-c", "import vlmcompress; vlmcompress.load('me/stock-clip')"],
                             capture_output=True, text=True, env=env, check=False)
    assert "Hub id 'me/stock-clip' is a stock model, not a vlmcompress checkpoint" in refused.stderr, refused.stderr


def test_a_compressed_checkpoint_resaved_by_its_stock_class_is_a_stock_model_again(tmp_path, capfd):
    """CLIPModel.from_pretrained(compressed).save_pretrained(...) keeps the compressed config's blocks, though the
    stock class applied none of them; compressing that folder must not carry a token reduction the weights never ran
    with into the new checkpoint."""
    import json

    from transformers import CLIPModel

    vlmcompress.apply({"model": "tiny-clip", "output": str(tmp_path / "a"),
                       "stages": [{"method": "token_reduce", "r": 4}]}, progress=False)
    CLIPModel.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "stock")
    assert json.loads((tmp_path / "stock" / "config.json").read_text())["token_reduction"] is not None
    capfd.readouterr()
    model, _ = load_model(str(tmp_path / "stock"))
    assert type(model).__name__ == "CLIPModel"
    assert not hasattr(model.config, "token_reduction") and not hasattr(model.config, "auto_map")
    assert "applies none of its vlmcompress / token_reduction records; they are dropped" in capfd.readouterr().err
    vlmcompress.apply({"model": str(tmp_path / "stock"), "output": str(tmp_path / "b"),
                       "stages": [{"method": "structured_prune", "ratio": 0.5}]}, progress=False)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["token_reduction"] is None and config["vlmcompress"]["base_model"] == "stock"
    loaded = vlmcompress.load(tmp_path / "b")
    inputs = BUILTIN_TINY["tiny-clip"].example_inputs(loaded, batch_size=2)
    with torch.no_grad():
        hidden = loaded.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    assert hidden.shape[1] == 65  # every patch token (+ CLS) reaches the last layer: no ToMe
