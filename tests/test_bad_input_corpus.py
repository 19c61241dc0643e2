"""The bad-input corpus (issue 18): hand-made bad recipes, each pinned to its message, and a seeded mutation fuzzer
over the shipped recipes. Every case runs `vlmcompress validate` as a user would; each must end in exit 0 with
nothing written (the mutation stayed valid) or exit 1 with one `error:` line — never an internal error, a
traceback or a written file. `VLMCOMPRESS_FUZZ_CASES` sets how many fuzzed cases run (CI: 300; the documented slow
run, `bash benchmarks/run_slow.sh`, 3,000); the summary is printed (`pytest -s`) and in docs/reliability.md."""

from __future__ import annotations

import copy
import os
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vlmcompress.cli import app

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
BASE = "model: tiny-clip\noutput: {out}\n"

HAND_MADE = [
    (BASE + "x: &a [1]\nstages: *a\n", "YAML aliases (*name) are not allowed"),
    (BASE + "stages: " + "[" * 80 + "]" * 80 + "\n", "nested deeper than 64 levels"),
    (BASE + "model: tiny-siglip\nstages: []\n", "is given twice in one mapping"),
    (BASE + "seed: 100000000000000000000000\nstages:\n  - method: token_reduce\n", "seed: Input should be less"),
    (BASE + "stages:\n  - method: token_reduce\n    r: true\n", "got true (a yes/no value)"),
    (BASE + "stages:\n  - method: token_reduce\n    algorithm: visionzip\n    dominant: false\n",
     "got false (a yes/no value)"),
    (BASE + "stages:\n  - method: token_reduce\n    algorithm: turbo\n    beta: .inf\n", "finite number"),
    (BASE + "stages:\n  - method: token_reduce\n    algorithm: [tome]\n", "expected one name, got a list"),
    (BASE + "stages:\n  - method: token_reduce\n    algorithm: {a: 1}\n", "expected one name, got a dict"),
    (BASE + "data:\n  eval: {builtin: shapes, split: abc}\nstages:\n  - method: token_reduce\n", "split 'abc'"),
    (BASE + "data:\n  eval: {builtin: shapes, size: 1000000000000}\nstages:\n  - method: token_reduce\n",
     "less than or equal to 10000000"),
    (BASE + "data:\n  eval: {builtin: [shapes]}\nstages:\n  - method: token_reduce\n", "(a list; give one name)"),
    (BASE + "stages:\n  - method: token_reduce\n  - method: token_reduce\n", "a second token_reduce stage"),
    (BASE + "stages:\n  - method: structured_prune\n    algorithm: tome\n    r: 8\n", "unknown keys 'algorithm', 'r'"),
    (BASE + "stages:\n  - method: structured_prune\n    ratio: {visoin: 0.2}\n", "'visoin' is not allowed (did you "
                                                                              "mean 'vision'?)"),
    (BASE + "stages:\n  - method: token_reduce\n    alpha: 3\n", "alpha does not apply to algorithm: tome (only to "
                                                                "turbo); remove it"),
    (BASE + "stages:\n  - method: token_reduce\n    algorithm: fastv\n", "fastv works on LLaVA-style models"),
    ("model: tiny-llava\noutput: {out}\nstages:\n  - method: token_reduce\n    algorithm: turbo\n"
     "    components: [text]\n", "turbo reduces only vision tokens on a llava model"),
    ("model: tiny-llava\noutput: {out}\nstages:\n  - method: token_reduce\n    algorithm: visionzip\n"
     "    dominant: 0\n", "dominant: 0 given"),
    ("model: {model_file}\noutput: {out}\nstages:\n  - method: token_reduce\n", "is a file; give the folder"),
    ("model: {list_config}\noutput: {out}\nstages:\n  - method: token_reduce\n", "holds a JSON list, not a config"),
    ("model: {bad_eos}\noutput: {out}\nstages:\n  - method: token_reduce\n", "outside its vocabulary of"),
    (BASE + "stages:\n  - method: token_reduce\n    r: 2.5\n", "fractional part"),
    (BASE + "stages:\n  - method: quantize\n  - method: token_reduce\n", "must be the last stage"),
]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """Files the hand-made cases point at: a model path that is a file, a config.json holding a list, a local CLIP
    whose eos_token_id lies outside its vocabulary."""
    from vlmcompress.adapters import BUILTIN_TINY

    root = tmp_path_factory.mktemp("corpus")
    (root / "weights.bin").write_bytes(b"not a folder")
    (root / "list_config").mkdir()
    (root / "list_config" / "config.json").write_text("[1, 2, 3]")
    model = BUILTIN_TINY["tiny-clip"].tiny_model(0)
    model.config.text_config.eos_token_id = 49407  # CLIP's default, with the tiny 1,000-token vocabulary
    model.save_pretrained(root / "bad_eos")
    return root


def _check(text: str, tmp_path: Path, monkeypatch) -> tuple[str, str]:
    """Run `vlmcompress validate` on `text`: ("valid" | "error", output); asserts the corpus rules."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("VLMCOMPRESS_CACHE", str(cache))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    output = result.output
    assert "internal error" not in output and "Traceback" not in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a check wrote a file"
    assert not cache.exists() or not any(cache.iterdir()), "a check wrote into the cache"
    if result.exit_code == 0:
        assert "nothing was written" in output
        return "valid", output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and lines and all(line.startswith("error:") for line in lines), output
    return "error", output


@pytest.mark.parametrize("text, words", HAND_MADE, ids=[f"case{i}" for i in range(len(HAND_MADE))])
def test_hand_made_bad_recipes(text, words, sandbox, tmp_path, monkeypatch):
    for name, value in {"out": tmp_path / "out", "model_file": sandbox / "weights.bin",
                        "list_config": sandbox / "list_config", "bad_eos": sandbox / "bad_eos"}.items():
        text = text.replace("{" + name + "}", str(value))
    outcome, output = _check(text, tmp_path, monkeypatch)
    assert outcome == "error" and words in output.replace("\n", " "), output
    assert len([line for line in output.splitlines() if line.startswith("error:")]) == 1, output


# ----------------------------------------------------------------------------------------------------------------
# the fuzzer

ODD_VALUES = [None, True, False, 0, -1, 2 ** 70, 1e308, float("inf"), "", "x" * 300, "tome", [], [1, "a"], {},
              {"a": {"b": 1}}, 0.5, -0.5, 3, "vision", ["vision", "vision"], "../..", "/"]


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _mutate(data: dict, rng: random.Random) -> dict:
    data = copy.deepcopy(data)
    paths = [p for p in _paths(data) if p[0] != "output"]
    if not paths:  # everything but the output was deleted already
        return data
    path = rng.choice(paths)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    kind = rng.choice(["value", "value", "delete", "rename", "duplicate"])
    if kind == "value":
        parent[key] = rng.choice(ODD_VALUES)
    elif kind == "delete":
        del parent[key]
    elif kind == "rename" and isinstance(key, str):
        parent[key[:-1] + rng.choice("xyz_")] = parent.pop(key)
    elif isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
    else:
        parent[key] = [parent[key], parent[key]]
    return data


def fuzz_cases(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    shipped = [yaml.safe_load(p.read_text()) for p in SHIPPED]
    cases = []
    while len(cases) < count:
        data = rng.choice(shipped)
        for _ in range(rng.choice([1, 1, 2, 3])):
            data = _mutate(data, rng)
        cases.append(yaml.safe_dump(data, sort_keys=False))
    return cases


def test_fuzzed_shipped_recipes(tmp_path, monkeypatch):
    count = int(os.environ.get("VLMCOMPRESS_FUZZ_CASES", "300"))
    outcomes = Counter()
    for i, text in enumerate(fuzz_cases(count)):
        case = tmp_path / f"case{i}"
        case.mkdir()
        data = yaml.safe_load(text)
        if isinstance(data, dict):  # keep every output inside the case's folder
            data["output"] = str(case / "out")
            text = yaml.safe_dump(data, sort_keys=False)
        outcome, _ = _check(text, case, monkeypatch)
        outcomes[outcome] += 1
    print(f"\nfuzzed {count} mutations of {len(SHIPPED)} shipped recipes: {outcomes['valid']} still valid (exit 0, "
          f"nothing written), {outcomes['error']} refused in one line; 0 internal errors, 0 tracebacks, 0 files "
          "written")
    assert outcomes["error"] > count // 3  # the mutations do break recipes
