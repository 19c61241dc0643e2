"""The command line as a user runs it: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmcompress.cli import app

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

PRUNE_TOME = """\
model: tiny-clip
output: {output}
stages:
  - method: structured_prune
    ratio: 0.5
  - method: token_reduce
    r: 8
"""


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).format(output=tmp_path / "out"))
    return path


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and all(line.startswith("error:") for line in lines), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def test_apply_writes_checkpoint_and_summary(tmp_path):
    recipe = write_recipe(tmp_path, PRUNE_TOME)
    result = runner.invoke(app, ["apply", str(recipe)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert "65 → 57 → 49" in result.output
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_vlmcompress.py", "token_ops.py", "recipe.yaml",
            "report.json", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "clip" and config["architectures"] == ["VlmcCLIPModel"]
    assert config["auto_map"]["AutoModel"] == "modeling_vlmcompress.VlmcCLIPModel"
    assert config["token_reduction"]["towers"][0]["tokens_per_layer"] == [57, 49]
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    card = (out / "README.md").read_text()
    # a built-in name is not a Hub id: no base_model (the body names the source)
    assert card.startswith("---\n") and "base_model" not in card.split("---")[1] and "trust_remote_code=True" in card
    assert not (tmp_path / "out.vlmcompress-work").exists()


def test_existing_output_is_refused_and_untouched_then_overwritten(tmp_path):
    recipe = write_recipe(tmp_path, PRUNE_TOME)
    out = tmp_path / "out"
    assert runner.invoke(app, ["apply", str(recipe)]).exit_code == 0  # an earlier output of vlmcompress
    (out / "keep.txt").write_text("earlier output")
    result = runner.invoke(app, ["apply", str(recipe)])
    assert_one_line_error(result, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "earlier output"
    result = runner.invoke(app, ["apply", str(recipe), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    # a folder of someone else's files is never replaced, even with --overwrite
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["apply", str(recipe), "--output", str(theirs), "--overwrite"])
    assert_one_line_error(result, "holds files vlmcompress did not write")
    assert (theirs / "notes.txt").read_text() == "mine"


def test_output_override_and_dry_run_writes_nothing(tmp_path):
    recipe = write_recipe(tmp_path, PRUNE_TOME)
    result = runner.invoke(app, ["apply", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "structured_prune" in result.output and "tokens 65 → 49" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    result = runner.invoke(app, ["apply", str(recipe), "--output", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "elsewhere" / "config.json").is_file() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("model: tiny-clip\noutput: {output}\nstages:\n  - method: structured_prune\n    ratoi: 0.5\n",
         ["recipe.yaml:5", "stages[0].ratoi", "did you mean 'ratio'"]),
        ("model: tiny-clip\noutput: {output}\nstages:\n  - method: tome\n", ["recipe.yaml:4", "token_reduce"]),
        ("model: tiny-clip\noutput: {output}\nstages:\n  - method: structured_prune\n    ratio: 1.0\n",
         ["recipe.yaml:5", "stages[0].ratio", "less than 1"]),
        ("model: tiny-clip\noutput: {output}\nstages:\n  - method: token_reduce\n    r: -2\n",
         ["stages[0].r", "greater than or equal to 0"]),
        ("model: tiny-clip\noutput: {output}\nstages:\n  - method: token_reduce\n    r: 2.5\n",
         ["stages[0].r"]),
        ("model: tiny-clip\noutput: {output}\nseed: abc\nstages:\n  - method: token_reduce\n",
         ["recipe.yaml:3", "seed"]),
    ],
)
def test_recipe_errors_are_one_line(tmp_path, text, fragments):
    recipe = write_recipe(tmp_path, text)
    for command in (["validate", str(recipe)], ["apply", str(recipe)]):
        assert_one_line_error(runner.invoke(app, command), *fragments)
    assert not (tmp_path / "out").exists()


def test_selector_matching_nothing(tmp_path):
    recipe = write_recipe(tmp_path, """\
        model: tiny-clip
        output: {output}
        stages:
          - method: structured_prune
            ratio: 0.5
            ignore: ["vision_model.encoder.layers.7.mlp"]
        """)
    result = runner.invoke(app, ["validate", str(recipe)])
    assert_one_line_error(result, "matches no module", "vision_model.encoder.layers.")


def test_component_the_model_lacks(tmp_path):
    recipe = write_recipe(tmp_path, """\
        model: tiny-clip
        output: {output}
        stages:
          - method: structured_prune
            ratio: {{llm: 0.5}}
        """)
    assert_one_line_error(runner.invoke(app, ["apply", str(recipe)]), "llm", "vision, text")
    assert not (tmp_path / "out").exists()


def test_missing_and_corrupt_model_folders(tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    corrupt = tmp_path / "corrupt_model"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    for model, fragment in ((empty, "no config.json"), (corrupt, "not valid JSON"), ("tiny-clipp", "tiny-clip")):
        recipe = write_recipe(tmp_path, f"model: {model}\noutput: {{output}}\nstages:\n  - method: token_reduce\n")
        assert_one_line_error(runner.invoke(app, ["apply", str(recipe)]), fragment)
    assert not (tmp_path / "out").exists()


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    recipe = write_recipe(tmp_path, f"model: tiny-clip\noutput: {blocker}/out\nstages:\n  - method: token_reduce\n")
    assert_one_line_error(runner.invoke(app, ["apply", str(recipe)]), "cannot write", "--output")


def test_missing_recipe_file(tmp_path):
    assert_one_line_error(runner.invoke(app, ["apply", str(tmp_path / "nope.yaml")]), "not found")


def test_debug_env_shows_traceback(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, "model: tiny-clip\noutput: {output}\nstages:\n  - method: nope\n")
    monkeypatch.setenv("VLMCOMPRESS_DEBUG", "1")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code != 0 and type(result.exception).__name__ == "RecipeError"


def test_inspect_list_methods_env(tmp_path):
    result = runner.invoke(app, ["inspect", "tiny-llava", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["family"] == "llava" and info["layer_num_heads"]["llm"] == [4, 4]
    assert set(info["components"]) == {"vision", "projector", "llm"}
    result = runner.invoke(app, ["list-methods"])
    assert result.exit_code == 0 and "structured_prune" in result.output and "token_reduce" in result.output
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0 and "transformers" in result.output


def test_inspect_compressed_checkpoint(tmp_path):
    recipe = write_recipe(tmp_path, PRUNE_TOME)
    assert runner.invoke(app, ["apply", str(recipe)]).exit_code == 0
    info = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "out"), "--json"]).output)
    assert info["class"] == "VlmcCLIPModel"
    assert info["token_reduction"]["vision"]["tokens_per_layer"] == [65, 57, 49]
    assert all(h == 2 for h in info["layer_num_heads"]["vision"])


def test_inspect_names_what_blip_text_reduction_counts(tmp_path, monkeypatch):
    """Turbo on BLIP's text encoder prunes image tokens read by cross-attention, not text tokens: inspect says so."""
    recipe = tmp_path / "blip.yaml"
    recipe.write_text(f"model: tiny-blip\noutput: {tmp_path / 'out'}\nstages:\n  - method: token_reduce\n"
                      "    algorithm: turbo\n    components: [vision, text]\n    r: 3\n")
    assert runner.invoke(app, ["apply", str(recipe)]).exit_code == 0
    info = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "out"), "--json"]).output)
    assert info["token_reduction"]["vision"]["counts"] == "tokens"
    text = info["token_reduction"]["text"]
    assert text["counts"] == "image tokens read by cross-attention"
    assert text["tokens_per_layer"][0] == info["token_reduction"]["vision"]["tokens_per_layer"][-1]
    from vlmcompress import cli

    monkeypatch.setattr(cli.console, "width", 250)  # one line per table row
    table = runner.invoke(app, ["inspect", str(tmp_path / "out")]).output
    assert "image tokens read by cross-attention: " in table


def test_killed_run_leaves_no_output(tmp_path):
    """A run killed (SIGKILL) in its second stage leaves no output folder, only the first stage's checkpoint."""
    recipe = write_recipe(tmp_path, PRUNE_TOME)
    code = textwrap.dedent(f"""
        import os, signal
        from vlmcompress.stages import token_reduce
        token_reduce.TokenReduceStage.run = lambda self, ctx: os.kill(os.getpid(), signal.SIGKILL)
        from vlmcompress.cli import app
        app(["apply", {str(recipe)!r}])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    work = tmp_path / "out.vlmcompress-work"
    assert (work / "stage-01" / "vlmcompress_stage.json").is_file()
    assert not (work / "stage-02").exists()
    result = runner.invoke(app, ["apply", str(recipe), "--resume"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").is_file() and not work.exists()


@pytest.mark.parametrize("backend", ["torchao", "onnxruntime"])
def test_the_cli_prints_no_third_party_import_noise(tmp_path, backend):
    """torchao's CUDA-kernel notes, torch's _pytree deprecations, transformers' torchvision fallbacks and loading
    bars, the ONNX exporter's torchvision notes are not the user's business (issue 17, point 7); VLMCOMPRESS_DEBUG=1
    lets them through."""
    import os
    import subprocess
    import sys

    if backend == "onnxruntime":
        pytest.importorskip("onnxscript")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: shapes-clip-small\noutput: {tmp_path / 'out'}\nstages:\n  - method: quantize\n"
                      f"    backend: {backend}\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("VLMCOMPRESS_DEBUG", None)
    commands = {"apply": ["apply", str(recipe)],
                "report": ["report", str(tmp_path / "out"), "--base", "shapes-clip-small", "--images", "1", "--out",
                           str(tmp_path / "report")]}
    for name, args in commands.items():
        if name == "report" and backend != "torchao":
            continue
        run = subprocess.run([sys.executable, "-m", "vlmcompress", *args], capture_output=True, text=True, env=env,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        # stdout holds the result; stderr at most the plain progress lines of a run longer than a few seconds
        out = [line for line in run.stdout.splitlines() if line.strip()]
        lines = out + [line for line in run.stderr.splitlines() if line.strip()]
        if name == "apply":
            assert out[0].startswith("wrote ") and out[-1].strip().startswith("load it:"), lines
        else:
            assert len(out) == 1 and out[0].startswith(f"wrote {tmp_path / 'report' / 'index.html'} "), lines
        assert all(line.startswith("stage ") for line in lines[len(out):]), lines
        for noise in ("Failed to load", "_pytree", "torchvision", "Warning", "Loading weights"):
            assert not any(noise in line for line in lines), (noise, lines)


def test_list_methods_names_every_choice_with_its_summary():
    import json

    from vlmcompress.stages.token_reduce.stage import ALGORITHMS

    result = runner.invoke(app, ["list-methods", "--json"])
    assert result.exit_code == 0, result.output
    entries = {e["method"]: e for e in json.loads(result.output)}
    assert set(entries["token_reduce"]["choices"]) == set(ALGORITHMS)
    assert all(summary for e in entries.values() for summary in e.get("choices", {}).values())
    assert set(entries["quantize"]["choices"]) >= {"torch", "torchao", "quanto", "neural_compressor", "onnxruntime"}
    table = runner.invoke(app, ["list-methods"]).output
    assert all(f"algorithm: {name}" in table for name in ALGORITHMS)


def test_eval_on_a_local_folder_gives_what_apply_measures(tmp_path):
    """`vlmcompress eval MODEL --data FOLDER` (issue 17, point 8): the recall `apply` measures on the same data."""
    import json

    from vlmcompress.accuracy import measure
    from vlmcompress.data import load_rows
    from vlmcompress.data.schema import DataSource
    from vlmcompress.data.sources import export_image_folder, load_source
    from vlmcompress.models import load_model

    folder = export_image_folder(load_source({"builtin": "shapes", "split": "test", "size": 60}, image_size=32),
                                 tmp_path / "folder")
    result = runner.invoke(app, ["eval", "shapes-clip-small", "--data", str(folder), "--size", "60", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output[result.output.index("{"):])  # (transformers' loading bar goes to stderr)
    model, processor = load_model("shapes-clip-small")
    expected = measure(model, processor, "clip", load_rows(DataSource(path=str(folder)), model, 0, 60))
    assert got["size"] == 60 and {k: got[k] for k in expected} == expected
