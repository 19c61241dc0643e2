"""Tests for the recipe schema and loader (`vlmcompress.recipe`).

Round trips (load → `to_yaml()` → load), error messages (`file:line: yaml.path: message (did you mean ...)`),
`yaml.safe_load`-only parsing, `prefix_hash`, and every shipped recipe under `recipes/`.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from vlmcompress.errors import RecipeError, StageOrderError  # noqa: E402
from vlmcompress.orchestrator import build_stages  # noqa: E402
from vlmcompress.recipe import Recipe, load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def write_stages(tmp_path: Path, stages: str) -> Path:
    """A tiny-clip recipe writing to out/x whose `stages:` list is `stages` (YAML lines keep their numbers: the
    header is three lines, model / output / stages)."""
    return write(tmp_path, "model: tiny-clip\noutput: out/x\nstages:\n" + textwrap.dedent(stages).lstrip("\n"))


def recipe_error(source) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(source)
    return str(info.value)


def problem(message: str, where: str, yaml_path: str, exact: bool = True) -> str:
    """The one line of `message` reported at `where` (`file:line`) for `yaml_path`.

    `exact=False` accepts anything after the YAML path (used where the path is known to carry extra segments).
    """
    prefix = f"{where}: {yaml_path}" + (": " if exact else "")
    found = [line for line in message.splitlines() if line.startswith(prefix)]
    assert found, f"no problem starting with {prefix!r} in:\n{message}"
    return found[0]


# ----------------------------------------------------------------------------------------------------------------
# round trips

ROUND_TRIP = {
    "minimal_token_reduce": {"model": "tiny-clip", "output": "out/a", "stages": [{"method": "token_reduce"}]},
    "float_ratio": {
        "model": "tiny-clip",
        "output": "out/b",
        "stages": [{"method": "structured_prune", "ratio": 0.3}],
    },
    "full": {
        "model": "tiny-blip",
        "output": "out/c",
        "seed": 7,
        "dtype": "bfloat16",
        "trust_remote_code": True,
        "data": {"train": {"builtin": "shapes", "size": 64}, "eval": {"path": "some/folder", "split": "test"}},
        "stages": [
            {"method": "structured_prune", "ratio": {"vision": 0.5, "text": 0.25}, "targets": ["mlp"],
             "ignore": ["re:vision_model\\.encoder\\.layers\\.0\\..*", "text_model.pooler"],
             "global_ranking": False},
            {"method": "token_reduce", "r": [16, -0.5], "proportional_attention": False},
        ],
    },
    "per_layer_list": {
        "model": "tiny-clip",
        "output": "out/d",
        "stages": [{"method": "token_reduce", "r": [8, 4]}, {"method": "structured_prune"}],
    },
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_round_trip_through_yaml_file(tmp_path, name):
    first = load_recipe(ROUND_TRIP[name])
    text = first.to_yaml()
    second = load_recipe(write(tmp_path, text))
    assert second.model_dump() == first.model_dump()
    assert second.to_yaml() == text
    # the written YAML is plain data (safe_dump), equal to the JSON-mode dict
    assert yaml.safe_load(text) == first.to_dict()
    # and also as YAML text (not a file) and as a dict
    assert load_recipe(text).model_dump() == first.model_dump()
    assert load_recipe(first.to_dict()).model_dump() == first.model_dump()


def test_defaults_are_filled_in():
    recipe = load_recipe(ROUND_TRIP["minimal_token_reduce"])
    assert recipe.seed == 0 and recipe.dtype == "float32" and recipe.trust_remote_code is False
    assert recipe.data is None
    stage = recipe.to_dict()["stages"][0]
    assert stage == {"method": "token_reduce", "algorithm": "tome", "r": 8, "components": ["vision"],
                     "proportional_attention": True}
    prune = load_recipe(ROUND_TRIP["per_layer_list"]).to_dict()["stages"][1]
    assert prune == {"method": "structured_prune", "importance": "magnitude", "ratio": 0.5,
                     "targets": ["heads", "mlp"], "ignore": [], "global_ranking": True,
                     "calibration_batches": 4, "calibration_batch_size": 32}


def test_resolved_yaml_names_every_default():
    text = load_recipe(ROUND_TRIP["minimal_token_reduce"]).to_yaml()
    for key in ("model:", "output:", "seed: 0", "dtype: float32", "trust_remote_code: false", "algorithm: tome",
                "r: 8", "proportional_attention: true"):
        assert key in text


def test_r_forms_survive_round_trip(tmp_path):
    ramp = load_recipe(ROUND_TRIP["full"]).stages[1]
    assert isinstance(ramp.r, tuple) and ramp.r == (16, -0.5)
    per_layer = load_recipe(ROUND_TRIP["per_layer_list"]).stages[0]
    assert isinstance(per_layer.r, list) and per_layer.r == [8, 4]
    single = load_recipe(ROUND_TRIP["minimal_token_reduce"]).stages[0]
    assert single.r == 8 and type(single.r) is int

    for name, index, kind in (("full", 1, tuple), ("per_layer_list", 0, list), ("minimal_token_reduce", 0, int)):
        again = load_recipe(write(tmp_path, load_recipe(ROUND_TRIP[name]).to_yaml(), f"{name}.yaml"))
        assert type(again.stages[index].r) is kind, name


def test_ratio_forms_survive_round_trip(tmp_path):
    full = load_recipe(write(tmp_path, load_recipe(ROUND_TRIP["full"]).to_yaml()))
    assert full.stages[0].ratio == {"vision": 0.5, "text": 0.25}
    flt = load_recipe(write(tmp_path, load_recipe(ROUND_TRIP["float_ratio"]).to_yaml(), "f.yaml"))
    assert flt.stages[0].ratio == pytest.approx(0.3) and isinstance(flt.stages[0].ratio, float)


def test_stage_configs_are_the_registered_classes():
    from vlmcompress.stages.structured_prune import StructuredPruneConfig
    from vlmcompress.stages.structured_prune.magnitude import MagnitudeConfig
    from vlmcompress.stages.token_reduce import TokenReduceConfig
    from vlmcompress.stages.token_reduce.tome import ToMeConfig

    recipe = load_recipe(ROUND_TRIP["full"])
    # each registered class dispatches on its choice (`importance:`, `algorithm:`) to the chosen plug-in's class
    assert [type(s) for s in recipe.stages] == [MagnitudeConfig, ToMeConfig]
    assert isinstance(recipe.stages[0], StructuredPruneConfig) and isinstance(recipe.stages[1], TokenReduceConfig)
    assert isinstance(recipe, Recipe)


def test_load_from_path_object_and_overrides(tmp_path):
    path = write_stages(tmp_path, """
          - method: token_reduce
            r: 4
    """)
    assert load_recipe(path).output == "out/x"
    assert load_recipe(str(path)).model_dump() == load_recipe(path).model_dump()
    changed = load_recipe(path, overrides={"output": "elsewhere", "seed": 3})
    assert changed.output == "elsewhere" and changed.seed == 3 and changed.stages[0].r == 4


# ----------------------------------------------------------------------------------------------------------------
# errors


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, """
        # leading comment
        modle: tiny-clip
        output: out/x
        stages:
          - method: token_reduce
    """)
    message = recipe_error(path)
    line = problem(message, f"{path}:2", "modle")
    assert "unknown key 'modle'" in line and "(did you mean 'model'?)" in line
    assert "valid keys here:" in line and "output" in line


def test_unknown_stage_key(tmp_path):
    path = write_stages(tmp_path, """
          - method: token_reduce
            r: 4
          - method: structured_prune
            ratio: 0.5
            ratoi: 0.5
    """)
    message = recipe_error(path)
    line = problem(message, f"{path}:8", "stages[1].ratoi")
    assert "unknown key 'ratoi'" in line and "(did you mean 'ratio'?)" in line
    assert "global_ranking" in line  # lists the valid keys of *this* stage's schema
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("typo", ["structured_prun", "structure_prune", "structured-prune"])
def test_unknown_method(tmp_path, typo):
    path = write_stages(tmp_path, f"""
          - method: token_reduce
          - method: {typo}
            ratio: 0.5
    """)
    line = problem(recipe_error(path), f"{path}:5", "stages[1].method")
    assert f"unknown method '{typo}'" in line and "(did you mean 'structured_prune'?)" in line
    assert "token_reduce" in line  # lists what is available


def test_unknown_method_tome_merge(tmp_path):
    path = write_stages(tmp_path, """
          - method: tome_merge
    """)
    line = problem(recipe_error(path), f"{path}:4", "stages[0].method")
    assert "unknown method 'tome_merge'" in line
    assert "available: distill, finetune, quantize, structured_prune, token_reduce" in line


def test_stage_without_method(tmp_path):
    path = write_stages(tmp_path, """
          - ratio: 0.5
    """)
    line = problem(recipe_error(path), f"{path}:4", "stages[0]")
    assert "`method:`" in line and "structured_prune" in line and "token_reduce" in line


def test_unknown_algorithm(tmp_path):
    path = write_stages(tmp_path, """
          - method: token_reduce
            r: 4
            algorithm: tomee
    """)
    line = problem(recipe_error(path), f"{path}:6", "stages[0].algorithm")
    assert "'tomee' is not allowed" in line and "(did you mean 'tome'?)" in line and "expected one of: tome" in line


def test_wrong_type(tmp_path):
    path = write(tmp_path, """
        model: tiny-clip
        output: out/x
        seed: abc
        stages:
          - method: token_reduce
    """)
    line = problem(recipe_error(path), f"{path}:3", "seed")
    assert "integer" in line and "'abc'" in line


def test_literal_in_list_and_top_level(tmp_path):
    path = write(tmp_path, """
        model: tiny-clip
        output: out/x
        dtype: float23
        stages:
          - method: structured_prune
            targets: [heads, neuron]
    """)
    message = recipe_error(path)
    assert "(did you mean 'float32'?)" in problem(message, f"{path}:3", "dtype")
    line = problem(message, f"{path}:6", "stages[0].targets[1]")
    assert "'neuron' is not allowed" in line and "heads, mlp" in line


def test_nested_data_key(tmp_path):
    path = write(tmp_path, """
        model: tiny-clip
        output: out/x
        data:
          train:
            bultin: shapes
        stages:
          - method: token_reduce
    """)
    line = problem(recipe_error(path), f"{path}:5", "data.train.bultin")
    assert "(did you mean 'builtin'?)" in line


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, """
        modle: tiny-clip
        output: out/x
        seed: abc
        stages:
          - method: structured_prune
            ratoi: 0.5
          - method: structured_prun
    """)
    message = recipe_error(path)
    problem(message, f"{path}:1", "modle")
    problem(message, f"{path}:3", "seed")
    problem(message, f"{path}:6", "stages[0].ratoi")
    problem(message, f"{path}:7", "stages[1].method")
    assert "model: required key is missing" in message


@pytest.mark.parametrize("value, hint", [("1.0", "less than 1"), ("-0.1", "greater than or equal to 0")])
def test_ratio_outside_unit_interval(tmp_path, value, hint):
    path = write_stages(tmp_path, f"""
          - method: token_reduce
          - method: structured_prune
            targets: [heads]
            ratio: {value}
    """)
    message = recipe_error(path)
    line = problem(message, f"{path}:7", "stages[1].ratio", exact=False)
    assert hint in message and value in line


def test_per_component_ratio_out_of_range(tmp_path):
    path = write_stages(tmp_path, """
          - method: structured_prune
            ratio:
              vision: 0.5
              text: 1.5
    """)
    message = recipe_error(path)
    problem(message, f"{path}:7", "stages[0].ratio.text")
    assert "less than 1" in message


def test_per_component_ratio_unknown_component(tmp_path):
    path = write_stages(tmp_path, """
          - method: structured_prune
            ratio:
              vision: 0.5
              visoin: 0.3
    """)
    line = problem(recipe_error(path), f"{path}:7", "stages[0].ratio.visoin")
    assert "'visoin'" in line and "not allowed" in line


def test_per_component_ratio_unknown_component_hint(tmp_path):
    path = write_stages(tmp_path, """
          - method: structured_prune
            ratio:
              visoin: 0.3
    """)
    line = problem(recipe_error(path), f"{path}:6", "stages[0].ratio.visoin")
    assert "(did you mean 'vision'?)" in line
    assert "vision, text, qformer, projector, llm" in line


@pytest.mark.parametrize("value, hint", [("-1", "greater than or equal to 0"), ("2.5", "fractional part")])
def test_bad_r(tmp_path, value, hint):
    path = write_stages(tmp_path, f"""
          - method: token_reduce
            algorithm: tome
            r: {value}
    """)
    message = recipe_error(path)
    problem(message, f"{path}:6", "stages[0].r", exact=False)
    assert hint in message


def test_negative_entry_in_per_layer_list_is_rejected(tmp_path):
    path = write_stages(tmp_path, """
          - method: token_reduce
            r: [8, 4, -2]
    """)
    problem(recipe_error(path), f"{path}:5", "stages[0].r", exact=False)


@pytest.mark.parametrize("stage, yaml_path", [
    ("{method: structured_prune, ratio: 1.0}", "stages[0].ratio"),
    ("{method: token_reduce, r: 2.5}", "stages[0].r"),
])
def test_union_errors_have_clean_yaml_path(tmp_path, stage, yaml_path):
    path = write_stages(tmp_path, f"""
          - {stage}
    """)
    message = recipe_error(path)
    problem(message, f"{path}:4", yaml_path)  # exactly `stages[0].ratio: ...`
    assert "constrained" not in message
    assert len(message.splitlines()) == 1, message


def test_missing_model(tmp_path):
    path = write(tmp_path, """
        output: out/x
        stages:
          - method: token_reduce
    """)
    line = problem(recipe_error(path), f"{path}:1", "model")
    assert "required key is missing" in line


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("", "NoneType")])
def test_not_a_mapping(tmp_path, text, kind):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    message = recipe_error(path)
    assert message.startswith(f"{path}: expected a mapping")
    assert message.endswith(f"got {kind}")


@pytest.mark.parametrize("text, line", [
    ("model: tiny-clip\noutput: out/x: y\nstages: []\n", 2),
    ("model: tiny-clip\noutput: out/x\nstages:\n  - method: token_reduce\n   r: 8\n", 5),
])
def test_invalid_yaml_syntax(tmp_path, text, line):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    message = recipe_error(path)
    assert message.startswith(f"{path}:{line}: not valid YAML")
    assert "fix the syntax" in message


def test_invalid_yaml_text_source():
    message = recipe_error("model: tiny-clip\noutput: out/x: y\n")
    assert message.startswith("<recipe>:2: not valid YAML")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = recipe_error(str(missing))
    assert f"'{missing}'" in message and "not found" in message
    assert recipe_error(missing)  # a Path too


def test_stages_not_a_list(tmp_path):
    path = write_stages(tmp_path, """
          method: token_reduce
    """)
    line = problem(recipe_error(path), f"{path}:3", "stages")
    assert "expected a list of stages" in line


# ----------------------------------------------------------------------------------------------------------------
# safe_load only


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/apply:subprocess.call"])
def test_python_tags_are_rejected_and_never_run(tmp_path, tag):
    marker = tmp_path / "executed"
    args = f'["touch {marker}"]' if "os.system" in tag else f'[["touch", "{marker}"]]'
    path = write(tmp_path, f"""
        model: tiny-clip
        output: out/x
        seed: {tag} {args}
        stages:
          - method: token_reduce
    """)
    message = recipe_error(path)
    assert f"{path}:3" in message and "python/object/apply" in message
    assert not marker.exists()
    # same as YAML text
    recipe_error(path.read_text())
    assert not marker.exists()


def test_python_name_tag_rejected(tmp_path):
    path = write(tmp_path, """
        model: !!python/name:os.system
        output: out/x
    """)
    recipe_error(path)


# ----------------------------------------------------------------------------------------------------------------
# prefix_hash


def _three_stages(**changes):
    stages = [
        {"method": "structured_prune", "ratio": 0.5},
        {"method": "token_reduce", "r": [8, 4]},
        {"method": "quantize", "backend": "torch", "scheme": "int8"},
    ]
    for index, update in changes.items():
        stages[int(index[1:])].update(update)
    return load_recipe({"model": "tiny-clip", "output": "out/x", "stages": stages})


def test_prefix_hash_tracks_each_stage():
    base = _three_stages()
    second_changed = _three_stages(s1={"r": 5})
    assert second_changed.prefix_hash(1) == base.prefix_hash(1)
    assert second_changed.prefix_hash(2) != base.prefix_hash(2)
    assert second_changed.prefix_hash(3) != base.prefix_hash(3)

    third_changed = _three_stages(s2={"scheme": "int8_dynamic"})
    assert [third_changed.prefix_hash(n) for n in (0, 1, 2)] == [base.prefix_hash(n) for n in (0, 1, 2)]
    assert third_changed.prefix_hash(3) != base.prefix_hash(3)

    first_changed = _three_stages(s0={"targets": ["mlp"]})
    assert all(first_changed.prefix_hash(n) != base.prefix_hash(n) for n in (1, 2, 3))
    assert first_changed.prefix_hash(0) == base.prefix_hash(0)


def test_prefix_hash_uses_resolved_config_and_ignores_output():
    base = _three_stages()
    explicit_defaults = _three_stages(s0={"importance": "magnitude", "global_ranking": True})
    assert explicit_defaults.prefix_hash(3) == base.prefix_hash(3)
    assert load_recipe(base.to_dict() | {"output": "other"}).prefix_hash(3) == base.prefix_hash(3)
    for key, value in (("seed", 1), ("model", "tiny-siglip"), ("dtype", "float16")):
        changed = load_recipe(base.to_dict() | {key: value})
        assert changed.prefix_hash(0) != base.prefix_hash(0), key
    assert base.prefix_hash(2) == base.prefix_hash(2) and len(base.prefix_hash(2)) == 16


# ----------------------------------------------------------------------------------------------------------------
# build_stages and the shipped recipes


def test_build_stages_needs_a_stage():
    with pytest.raises(StageOrderError, match="no stages"):
        build_stages(load_recipe({"model": "tiny-clip", "output": "out/x"}))


def test_build_stages_instantiates_in_order():
    stages = build_stages(_three_stages())
    assert [s.config.method for s in stages] == ["structured_prune", "token_reduce", "quantize"]
    assert stages[1].config.r == [8, 4]


def test_recipes_glob_is_rooted_at_the_repository():
    assert (ROOT / "vlmcompress" / "recipe.py").is_file()
    assert all(p.parent == ROOT / "recipes" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_loads_and_builds(tmp_path, path):
    recipe = load_recipe(path)
    stages = build_stages(recipe)
    assert len(stages) == len(recipe.stages) >= 1
    again = load_recipe(write(tmp_path, recipe.to_yaml()))
    assert again.model_dump() == recipe.model_dump()


# ----------------------------------------------------------------------------------------------------------------
# bounded input (issue 18): what a few bytes can do to a YAML parser, and values pydantic would let through

BASE = "model: tiny-clip\noutput: out/x\n"


@pytest.mark.parametrize("text, line, words", [
    (BASE + "x: &a [1]\nstages: *a\n", 4, "YAML aliases (*name) are not allowed"),
    # the 452-byte "billion laughs": 9 levels of 9 aliases each would expand to 9^9 strings
    ("a: &a [" + ",".join(['"lol"'] * 9) + "]\n" + "".join(
        f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefgh", "bcdefghi")), 2,
     "YAML aliases"),
    (BASE + "stages: " + "[" * 100 + "]" * 100 + "\n", 3, "nested deeper than 64 levels"),
    (BASE + "model: tiny-siglip\nstages: []\n", 3, "key 'model' is given twice in one mapping (also on line 1)"),
    (BASE + "seed: 100000000000000000000000\nstages: []\n", 3, "seed: Input should be less than or equal to"),
    (BASE + "stages:\n  - method: token_reduce\n    r: true\n", 5, "expected a number or a name, got true"),
    (BASE + "stages:\n  - method: token_reduce\n    algorithm: turbo\n    beta: .inf\n", 6, "finite number"),
    (BASE + "stages:\n  - method: token_reduce\n    algorithm: [tome]\n", 5, "expected one name, got a list"),
    (BASE + "stages:\n  - method: token_reduce\n    algorithm: {x: 1}\n", 5, "expected one name, got a dict"),
    (BASE + "data:\n  eval: {builtin: shapes, split: abc}\nstages: []\n", 4, "split 'abc' is not a split"),
    (BASE + "data:\n  eval: {builtin: shapes, size: 1000000000000}\nstages: []\n", 4, "less than or equal to 10000000"),
    (BASE + "data:\n  eval: {builtin: [shapes]}\nstages: []\n", 4, "(a list; give one name)"),
    (BASE + "stages:\n  - method: token_reduce\n  - method: token_reduce\n", 5, "a second token_reduce stage"),
])
def test_bounded_input_is_one_line_naming_the_line(tmp_path, text, line, words):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    message = recipe_error(path)
    assert message.startswith(f"{path}:{line}: ") and words in message and "\n" not in message, message
    assert "did you mean" not in message or "[" not in message


def test_oversized_and_non_utf8_recipes_are_refused_before_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(BASE + "stages: []\n" + "# padding\n" * 120_000)
    assert "a recipe is at most 1,048,576 bytes" in recipe_error(big)
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_bytes((BASE + "stages: []\n").encode("utf-16"))
    assert "not UTF-8 text (byte 0 is 0xff); save the recipe as UTF-8" in recipe_error(utf16)
    bom = tmp_path / "bom.yaml"  # a UTF-8 byte-order mark is fine
    bom.write_bytes((BASE + "stages: []\n").encode("utf-8-sig"))
    assert load_recipe(bom).model == "tiny-clip"
