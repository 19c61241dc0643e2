"""Tests for the method registry (`vlmcompress.registry`): lookup, suggestions, checked registration, and a custom
method that becomes usable from a recipe."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typing import Literal  # noqa: E402

import pytest  # noqa: E402
from pydantic import BaseModel  # noqa: E402

import vlmcompress  # noqa: E402
from vlmcompress import registry  # noqa: E402
from vlmcompress.errors import RecipeError, UnknownMethodError, VlmCompressError  # noqa: E402
from vlmcompress.orchestrator import build_stages  # noqa: E402
from vlmcompress.recipe import load_recipe  # noqa: E402
from vlmcompress.registry import get_method, list_methods, register_method  # noqa: E402
from vlmcompress.stages.base import Stage, StageConfig, StageReport  # noqa: E402
from vlmcompress.stages.structured_prune import StructuredPruneConfig, StructuredPruneStage  # noqa: E402
from vlmcompress.stages.token_reduce import TokenReduceConfig, TokenReduceStage  # noqa: E402


class MyMethodConfig(StageConfig):
    method: Literal["my_method"]
    strength: float = 1.0


class MyMethodStage(Stage):
    """Count parameters and change nothing (a test method).

    Second docstring line, not part of the summary.
    """

    calls: list = []

    def run(self, ctx):
        MyMethodStage.calls.append(self.config.strength)
        params = sum(p.numel() for p in ctx.model.parameters())
        return StageReport(method="my_method", params_before=params, params_after=params,
                           details={"strength": self.config.strength})


@pytest.fixture
def my_method():
    list_methods()  # built-ins first, so that the snapshot below includes them
    before = dict(registry._METHODS)
    MyMethodStage.calls = []
    register_method("my_method", MyMethodConfig, MyMethodStage)
    yield registry._METHODS["my_method"]
    registry._METHODS.pop("my_method", None)
    assert registry._METHODS == before


def test_builtin_methods_are_listed():
    entries = {m.name: m for m in list_methods()}
    assert {"structured_prune", "token_reduce"} <= set(entries)
    assert [m.name for m in list_methods()] == sorted(entries)
    assert entries["structured_prune"].config_cls is StructuredPruneConfig
    assert entries["structured_prune"].stage_cls is StructuredPruneStage
    assert entries["token_reduce"].config_cls is TokenReduceConfig
    assert entries["token_reduce"].stage_cls is TokenReduceStage
    assert all(m.summary for m in entries.values())
    assert vlmcompress.list_methods is list_methods and vlmcompress.register_method is register_method


def test_get_method_returns_entry():
    assert get_method("token_reduce").stage_cls is TokenReduceStage


@pytest.mark.parametrize("typo", ["structured_prun", "Structured_Prune", "structuredprune"])
def test_get_method_suggests_closest(typo):
    with pytest.raises(UnknownMethodError) as info:
        get_method(typo)
    message = str(info.value)
    assert f"unknown method '{typo}'" in message
    assert "(did you mean 'structured_prune'?)" in message
    assert "available:" in message and "token_reduce" in message


def test_get_method_without_close_match_lists_available():
    with pytest.raises(UnknownMethodError) as info:
        get_method("quantise_everything_please")
    message = str(info.value)
    assert "did you mean" not in message
    assert "structured_prune" in message and "token_reduce" in message


@pytest.mark.parametrize("name", ["MyMethod", "my-method", "1method", "_private", "my method", "", "méthode"])
def test_register_rejects_non_snake_case(name):
    before = dict(registry._METHODS)
    with pytest.raises(VlmCompressError, match="snake_case"):
        register_method(name, MyMethodConfig, MyMethodStage)
    assert registry._METHODS == before


def test_register_rejects_duplicates():
    list_methods()
    before = dict(registry._METHODS)
    with pytest.raises(VlmCompressError, match="already registered by StructuredPruneStage"):
        register_method("structured_prune", MyMethodConfig, MyMethodStage)
    assert registry._METHODS == before
    assert get_method("structured_prune").stage_cls is StructuredPruneStage


def test_register_rejects_duplicate_of_custom(my_method):
    with pytest.raises(VlmCompressError, match="already registered by MyMethodStage"):
        register_method("my_method", MyMethodConfig, MyMethodStage)


class NoMethodConfig(BaseModel):
    strength: float = 1.0


class PlainClass:
    pass


@pytest.mark.parametrize("config_cls", [NoMethodConfig, PlainClass])
def test_register_rejects_config_without_method_field(config_cls):
    before = dict(registry._METHODS)
    with pytest.raises(VlmCompressError, match="no `method` field") as info:
        register_method("no_method_here", config_cls, MyMethodStage)
    assert config_cls.__name__ in str(info.value)
    assert "no_method_here" not in registry._METHODS and registry._METHODS == before


def test_custom_method_is_listed(my_method):
    assert "my_method" in [m.name for m in list_methods()]
    assert my_method.summary == "Count parameters and change nothing (a test method)."
    assert get_method("my_method").config_cls is MyMethodConfig


def test_custom_method_loads_from_recipe(tmp_path, my_method):
    recipe = load_recipe({"model": "tiny-clip", "output": "out/x",
                          "stages": [{"method": "my_method", "strength": 2}, {"method": "token_reduce", "r": 2}]})
    assert isinstance(recipe.stages[0], MyMethodConfig) and recipe.stages[0].strength == 2.0
    stages = build_stages(recipe)
    assert isinstance(stages[0], MyMethodStage) and isinstance(stages[1], TokenReduceStage)
    # the resolved YAML keeps the custom config's fields and loads back to the same recipe
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert "strength: 2.0" in path.read_text()
    assert load_recipe(path).model_dump() == recipe.model_dump()


def test_custom_method_errors_use_its_schema(tmp_path, my_method):
    path = tmp_path / "r.yaml"
    path.write_text("model: tiny-clip\noutput: out/x\nstages:\n  - method: my_method\n    strenght: 2\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:5: stages[0].strenght: unknown key 'strenght' (did you mean 'strength'?)" in str(info.value)
    with pytest.raises(RecipeError, match=r"did you mean 'my_method'"):
        load_recipe({"model": "tiny-clip", "output": "o", "stages": [{"method": "my_methd"}]})


def test_custom_method_runs_in_apply(my_method):
    model = vlmcompress.apply({"model": "tiny-clip", "output": "unused",
                               "stages": [{"method": "my_method", "strength": 3}]}, save=False, progress=False)
    assert MyMethodStage.calls == [3.0]
    stage_report = model.vlmcompress_report["stages"][0]
    assert stage_report["method"] == "my_method" and stage_report["details"] == {"strength": 3.0}


def test_custom_method_gone_after_cleanup():
    assert "my_method" not in [m.name for m in list_methods()]
    with pytest.raises(UnknownMethodError):
        get_method("my_method")


def test_register_method_rejects_mismatched_literal():
    from typing import Literal

    from vlmcompress.errors import VlmCompressError
    from vlmcompress.registry import register_method
    from vlmcompress.stages.base import Stage, StageConfig

    class BarConfig(StageConfig):
        method: Literal["bar"]

    with pytest.raises(VlmCompressError, match="expected Literal\\['foo'\\]"):
        register_method("foo", BarConfig, Stage)
