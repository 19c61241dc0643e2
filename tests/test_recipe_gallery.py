"""Every recipe in `recipes/` and `recipes/gallery/` validates on a weightless model, and the gallery cannot drift.

Recipes on built-in models are validated as `vlmcompress validate PATH` runs them. Recipes on Hub models (the
gallery's reproductions of the papers' pipelines) cannot be downloaded here, so their `model` is replaced by the
matching hand-written config in `tests/fixtures/hub_configs/<org>--<name>/` (a folder with only `config.json`, which
`load_model(..., meta=True)` builds a meta-device model from) and their `output` by a folder under `tmp_path`. The
`data` blocks stay as written: `validate` checks the data sources' schema but never loads them (no download), so the
Hugging Face datasets they name are not fetched.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vlmcompress.cli import app
from vlmcompress.models import builtin_names

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
GALLERY = RECIPES / "gallery"
HUB_CONFIGS = Path(__file__).resolve().parent / "fixtures" / "hub_configs"
ALL_RECIPES = sorted(RECIPES.glob("*.yaml")) + sorted(GALLERY.glob("*.yaml"))
# the papers the gallery reproduces (SmartTrim and MADTP are not implemented yet: no recipe)
PAPERS = ("tome", "turbo", "crossget", "efficientvlm", "fastv", "visionzip", "prumerge")
# parameter counts of the meta models built from the fixtures (the Hub shows them rounded: 150M, 224M, 7.06B)
FIXTURE_PARAMS = {
    "openai/clip-vit-base-patch16": ("CLIPModel", 149_620_737),
    "Salesforce/blip-itm-base-coco": ("BlipForImageTextRetrieval", 223_744_258),
    "llava-hf/llava-1.5-7b-hf": ("LlavaForConditionalGeneration", 7_063_427_072),
}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _is_hub_id(model: str) -> bool:
    return model not in builtin_names() and "/" in model and not (ROOT / model).exists()


def _fixture(hub_id: str) -> Path:
    return HUB_CONFIGS / hub_id.replace("/", "--")


def _hub_ids(paths) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {}
    for path in paths:
        model = _load(path)["model"]
        if _is_hub_id(model):
            ids.setdefault(model, []).append(_rel(path))
    return ids


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def _validate(recipe: Path) -> str:
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, f"validate {recipe} failed (exit {result.exit_code}):\n{result.output}"
    return result.output


def _assert_plan_names_every_stage(output: str, stages: list[dict], where: str) -> None:
    assert "recipe is valid; nothing was written" in output, output
    for i, stage in enumerate(stages, 1):
        row = re.compile(rf"[│|]\s*{i}\s*[│|]\s*{re.escape(stage['method'])}\s*[│|]")
        assert row.search(output), f"{where}: the plan has no row '{i} {stage['method']}':\n{output}"


def test_the_recipes_are_found():
    assert len(list(RECIPES.glob("*.yaml"))) >= 10
    assert len(list(GALLERY.glob("*.yaml"))) >= 2 * len(PAPERS)


@pytest.mark.parametrize("path", ALL_RECIPES, ids=_rel)
def test_recipe_validates_on_a_weightless_model(path, tmp_path, monkeypatch):
    recipe = _load(path)
    monkeypatch.chdir(tmp_path)  # a relative `output:` would land here, so "nothing written" is checkable
    if _is_hub_id(recipe["model"]):
        fixture = _fixture(recipe["model"])
        assert (fixture / "config.json").is_file(), (f"{_rel(path)} uses the Hub model {recipe['model']}, which has "
                                                     f"no fixture config at {fixture.relative_to(ROOT)}/config.json")
        output = tmp_path / "out" / path.stem
        # data stays as written: validate never loads it (the Hugging Face datasets are not downloaded)
        target = tmp_path / path.name
        target.write_text(yaml.safe_dump(recipe | {"model": str(fixture), "output": str(output)}), encoding="utf-8")
    else:
        output = tmp_path / recipe["output"]
        target = path  # as `vlmcompress validate recipes/...` runs it
    before = _files(tmp_path)
    printed = _validate(target)
    _assert_plan_names_every_stage(printed, recipe["stages"], _rel(path))
    assert not output.exists(), f"validate wrote the output folder {output}"
    assert _files(tmp_path) == before, f"validate wrote files: {sorted(_files(tmp_path) - before)}"


def test_every_hub_model_of_the_gallery_has_a_fixture_config():
    ids = _hub_ids(sorted(GALLERY.glob("*.yaml")))
    assert ids, "the gallery names no Hub model"
    missing = {i: used for i, used in ids.items() if not (_fixture(i) / "config.json").is_file()}
    assert not missing, (f"Hub models without tests/fixtures/hub_configs/<org>--<name>/config.json: {missing}; "
                         "write their config.json by hand from the public config")
    assert set(ids) <= set(FIXTURE_PARAMS), f"add the new fixture to FIXTURE_PARAMS: {set(ids) - set(FIXTURE_PARAMS)}"
    assert (HUB_CONFIGS / "README.md").is_file()


@pytest.mark.parametrize("hub_id", sorted(FIXTURE_PARAMS))
def test_fixture_configs_build_the_real_architectures(hub_id):
    from vlmcompress.models import load_model
    from vlmcompress.stages.base import count_params

    model, processor = load_model(str(_fixture(hub_id)), meta=True)
    cls, params = FIXTURE_PARAMS[hub_id]
    assert type(model).__name__ == cls
    assert count_params(model) == params
    assert processor is None  # config.json alone: validate needs no processor files


def test_every_paper_has_a_hub_recipe_and_a_shapes_twin():
    names = {p.stem for p in GALLERY.glob("*.yaml")}
    for paper in PAPERS:
        assert f"{paper}_shapes" in names, f"no recipes/gallery/{paper}_shapes.yaml"
        twin = _load(GALLERY / f"{paper}_shapes.yaml")
        assert twin["model"] in builtin_names(), f"{paper}_shapes.yaml must run on a built-in model"
        hub = [n for n in names if n.startswith(f"{paper}_") and n != f"{paper}_shapes"]
        assert hub, f"no Hub recipe for {paper}"
        for name in hub:
            model = _load(GALLERY / f"{name}.yaml")["model"]
            assert _is_hub_id(model) and name == f"{paper}_{model.split('/')[-1]}", (name, model)
    assert not {n for n in names if n.split("_")[0] not in PAPERS}, "a gallery recipe of an unknown paper"


def test_the_gallery_page_lists_every_gallery_recipe():
    page = (ROOT / "docs" / "gallery.md").read_text(encoding="utf-8")
    for path in sorted(GALLERY.glob("*.yaml")):
        assert f"`{_rel(path)}`" in page, f"docs/gallery.md does not list {_rel(path)}"
    for planned in ("SmartTrim", "MADTP"):
        assert re.search(rf"{planned}.*planned: not implemented yet", page), planned
