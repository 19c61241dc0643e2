"""The recipe schema and its YAML loader.

A recipe is a YAML file (read with `yaml.SafeLoader` only; aliases, nesting deeper than 64, keys given twice and
files over 1 MiB are refused) with `model`, `output`, `data`, `seed`, `dtype`, `trust_remote_code` and an ordered
list of `stages`, each discriminated by its `method:`. Errors name the file, the
line, the YAML path and the nearest valid key or method. `Recipe.to_yaml()` writes the resolved recipe (all defaults
filled in); loading that text again gives an identical recipe.
"""

from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SerializeAsAny, ValidationError

from . import stages as _builtin_methods  # noqa: F401  (importing the method packages registers them)
from .data.schema import DataSource, DataSpec
from .errors import RecipeError, UnknownMethodError, did_you_mean
from .registry import get_method, list_methods
from .schema import StageConfig, StrictModel, UnknownChoiceError
from .stages.base import decision_stage

__all__ = ["DataSource", "DataSpec", "Guards", "Recipe", "load_recipe"]

DType = Literal["float32", "bfloat16", "float16"]


class Guards(StrictModel):
    """Accuracy guards checked after every stage against the uncompressed model on `data.eval`."""

    max_drop: dict[str, float] = Field(
        default_factory=dict,
        description="largest allowed drop in points (0-100) per metric, e.g. {recall@1: 1.0}; metrics: recall@1, "
                    "recall@5, recall@10 (mean of both directions), i2t_R@1, t2i_R@1, ..., zero_shot_shape")


class Recipe(StrictModel):
    """A compression recipe: which model, where to write it, and the ordered stages."""

    model: str = Field(description="a local save_pretrained folder, a built-in name (tiny-clip, ...) or a Hub id")
    output: str = Field(description="folder the compressed checkpoint is written to (created atomically)")
    data: DataSpec | None = None
    guards: Guards | None = None
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed (0 … 2³² − 1, numpy's range)")
    dtype: DType = Field("float32", description="dtype the source model is loaded in")
    trust_remote_code: bool = Field(False, description="allow custom code of the *source* model to run")
    stages: list[SerializeAsAny[StageConfig]] = Field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def prefix_hash(self, num_stages: int, decisions: dict[str, Any] | None = None) -> str:
        """Hash of everything that determines the weights after the first `num_stages` stages: the recipe's part and
        what those stages decided from the machine (`decisions`, keyed `stage-NN/...`)."""
        d = self.to_dict()
        key = {k: d[k] for k in ("model", "data", "seed", "dtype")} | {"stages": d["stages"][:num_stages]}
        taken = {k: v for k, v in (decisions or {}).items() if decision_stage(k) <= num_stages}
        if taken:
            key["decisions"] = taken
        # guards decide whether a run stops, never what the weights are: they stay out of the hash
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# loading


def load_recipe(source: str | Path | dict, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe from a YAML file path, YAML text or a dict.

    Raises:
        RecipeError: with `file:line: yaml.path: problem (did you mean ...)` for every problem found.
    """
    filename, lines = "<recipe>", {}
    if isinstance(source, dict):
        data = source
    else:
        text, filename = _read_text(source)
        data, lines = parse_yaml(text, filename)
    if not isinstance(data, dict):
        raise RecipeError(f"{filename}: expected a mapping with keys model, output, stages; got {type(data).__name__}")
    data = dict(data) | (overrides or {})
    return _validate(data, filename, lines)


MAX_RECIPE_BYTES = 1 << 20  # recipes are a few hundred bytes; anything near this is not a recipe
MAX_RECIPE_DEPTH = 64  # nesting levels of mappings and lists


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # not a usable path (e.g. longer than the filesystem allows)
        return False


def _read_text(source: str | Path) -> tuple[str, str]:
    path = Path(source)
    if isinstance(source, str) and ("\n" in source or (": " in source and not _is_file(path))):
        return _bounded(source, "<recipe>"), "<recipe>"
    if not _is_file(path):
        raise RecipeError(f"recipe file '{source}' not found; expected a YAML file, e.g. recipes/quickstart.yaml")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {path.stat().st_size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} bytes "
                          "(1 MiB); is this the right file?")
    raw = path.read_bytes()
    try:
        return _bounded(raw.decode("utf-8-sig"), str(path)), str(path)
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); save the recipe as "
                          "UTF-8") from None


def _bounded(text: str, filename: str) -> str:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{filename}: more than {MAX_RECIPE_BYTES:,} bytes (1 MiB); a recipe is a short YAML file")
    return text


class _InputError(Exception):
    """A recipe refused while parsing: `(line, message)`."""


class _RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases (`*name`: a few hundred bytes can expand to gigabytes), nesting deeper
    than `MAX_RECIPE_DEPTH` and keys given twice in one mapping (YAML would silently keep the last)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _InputError(self.peek_event().start_mark.line + 1,
                              "YAML aliases (*name) are not allowed in a recipe; write the value out")
        self._depth += 1
        try:
            if self._depth > MAX_RECIPE_DEPTH:
                raise _InputError(self.peek_event().start_mark.line + 1,
                                  f"nested deeper than {MAX_RECIPE_DEPTH} levels; a recipe needs a handful")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise _InputError(key_node.start_mark.line + 1, f"key {key!r} is given twice in one mapping (also "
                                                                f"on line {seen[key]}); keep one")
            if key is not None:
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, filename: str) -> tuple[Any, dict[tuple, int]]:
    """(data, YAML path → line) of a recipe's text, in one pass of the guarded safe loader."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
        return data, _line_map(node)
    except _InputError as e:
        line, message = e.args
        raise RecipeError(f"{filename}:{line}: {message}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        raise RecipeError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    finally:
        loader.dispose()


def _validate(data: dict[str, Any], filename: str, lines: dict[tuple, int]) -> Recipe:
    problems: list[str] = []
    raw_stages = data.get("stages", [])
    stages: list[StageConfig] = []
    if not isinstance(raw_stages, list):
        got = type(raw_stages).__name__
        problems.append(_fmt(filename, lines, ("stages",), f"expected a list of stages, got {got}"))
        raw_stages = []
    for i, raw in enumerate(raw_stages):
        loc = ("stages", i)
        if not isinstance(raw, dict) or "method" not in raw:
            methods = ", ".join(m.name for m in list_methods())
            problems.append(_fmt(filename, lines, loc, f"each stage needs a `method:` key (one of: {methods})"))
            continue
        try:
            entry = get_method(str(raw["method"]))
        except UnknownMethodError as e:
            problems.append(_fmt(filename, lines, (*loc, "method"), str(e)))
            continue
        try:
            config_cls = entry.config_cls.config_class(raw)
        except UnknownChoiceError as e:
            allowed = e.allowed
            if isinstance(e.given, str):
                problems.append(_fmt(filename, lines, (*loc, e.key), f"{e.given!r} is not allowed"
                                     f"{did_you_mean(e.given, allowed)}; expected one of: {', '.join(allowed)}"))
            else:
                problems.append(_fmt(filename, lines, (*loc, e.key), f"expected one name, got a "
                                     f"{type(e.given).__name__} ({e.given!r}); give one of: {', '.join(allowed)}"))
            continue
        try:
            stages.append(config_cls.model_validate(raw))
        except ValidationError as e:
            problems += _fmt_errors(filename, lines, config_cls, _one_per_loc(e), loc)
    reducing = [i for i, raw in enumerate(raw_stages) if isinstance(raw, dict) and raw.get("method") == "token_reduce"]
    for i in reducing[1:]:  # a checkpoint holds one token_reduction block
        problems.append(_fmt(filename, lines, ("stages", i, "method"), f"a second token_reduce stage (the first is "
                             f"stages[{reducing[0]}]); a checkpoint holds one token reduction: keep one stage, with "
                             "components: [...] for several towers"))
    top = {k: v for k, v in data.items() if k != "stages"}
    try:
        recipe = Recipe.model_validate(top | {"stages": []})
    except ValidationError as e:
        problems = _fmt_errors(filename, lines, Recipe, _one_per_loc(e), ()) + problems
        recipe = None
    if problems:
        raise RecipeError("\n".join(problems))
    recipe.stages = stages  # validated above, one config class per method
    return recipe


def _fmt(filename: str, lines: dict[tuple, int], loc: tuple, message: str) -> str:
    line = _nearest_line(lines, loc)
    where = f"{filename}:{line}" if line else filename
    return f"{where}: {_yaml_path(loc) or '(top level)'}: {message}"


_BRANCH_PREFIXES = ("constrained-", "function-")
_BRANCH_NAMES = {"int", "float", "str", "bool", "list", "tuple", "dict"}


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch tags (`constrained-float`, `list[int]`, ...) from an error location."""
    return tuple(x for x in loc if not (isinstance(x, str) and
                                        ("[" in x or x.startswith(_BRANCH_PREFIXES) or x in _BRANCH_NAMES)))


def _one_per_loc(error: ValidationError) -> list[dict]:
    """One error per location: for a union, the branch that matched the input's type says what is wrong."""
    chosen: dict[tuple, dict] = {}
    for err in error.errors():
        loc = _clean_loc(err["loc"])
        # "Input should be a valid list" comes from a union branch the input never tried to be
        wrong_type = err["type"].endswith("_type") or err["type"] == "dict_type"
        if loc not in chosen or (chosen[loc]["_wrong_type"] and not wrong_type):
            chosen[loc] = err | {"loc": loc, "_wrong_type": wrong_type}
    return list(chosen.values())


def _fmt_errors(filename: str, lines: dict[tuple, int], cls: type[BaseModel], errors: list[dict],
                prefix: tuple) -> list[str]:
    """One line per problem; unknown keys of one mapping share one line (a stage whose `method:` changed would
    otherwise repeat the list of valid keys for each of its keys)."""
    out, unknown = [], {}
    locs = [_clean_loc(err["loc"]) for err in errors]
    for err, loc in zip(errors, locs):
        # a union's "wrong type" branch (`ratio: {visoin: 0.2}` is not a number) says less than the deeper error of
        # the branch that fits the value's type (the unknown component): keep only the deeper one
        if err["type"].endswith(("_type", "_parsing")) and any(len(o) > len(loc) and o[:len(loc)] == loc for o in locs):
            continue
        if err["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
        else:
            out.append(_fmt_pydantic(filename, lines, cls, err, prefix))
    for parent, keys in unknown.items():
        valid = _fields_at(cls, parent)
        if len(keys) == 1:
            message = f"unknown key '{keys[0]}'{did_you_mean(keys[0], valid)}; valid keys here: {', '.join(valid)}"
        else:
            message = (f"unknown keys {', '.join(repr(k) for k in keys)}; valid keys here: {', '.join(valid)}; "
                       "remove them or check the method")
        out.insert(0, _fmt(filename, lines, prefix + parent + ((keys[0],) if len(keys) == 1 else ()), message))
    return out


def _fmt_pydantic(filename: str, lines: dict[tuple, int], cls: type[BaseModel], err: dict, prefix: tuple) -> str:
    loc = _clean_loc(err["loc"])
    kind, message = err["type"], err["msg"]
    if kind == "extra_forbidden":
        valid = _fields_at(cls, loc[:-1])
        hint = did_you_mean(str(loc[-1]), valid)
        message = f"unknown key '{loc[-1]}'{hint}; valid keys here: {', '.join(valid)}"
    elif kind == "literal_error":
        allowed = _literal_values(cls, loc)
        given = err.get("input")
        hint = did_you_mean(given, allowed) if isinstance(given, str) else f" (a {type(given).__name__}; give one name)"
        message = f"{given!r} is not allowed{hint}; expected one of: {', '.join(allowed)}"
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    else:
        message = f"{message} (got {err.get('input')!r})"
    return _fmt(filename, lines, prefix + loc, message)


def _unwrap(annotation: Any) -> list[Any]:
    """The classes an annotation may hold (through Optional, list, dict, Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is None:
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out += _unwrap(arg)
    return out + ([annotation] if origin is Literal else [])


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        models = [t for t in _unwrap(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        cls = models[0] if models else None
    return cls


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    model = _model_at(cls, loc)
    return list(model.model_fields) if model else []


def _literal_values(cls: type[BaseModel], loc: tuple) -> list[str]:
    names = [p for p in loc if isinstance(p, str)]
    field = None
    while names and field is None:  # a dict key (e.g. a component name) is not a field: use its dict's field
        model = _model_at(cls, tuple(names[:-1]))
        field = model.model_fields.get(names[-1]) if model else None
        names = names[:-1]
    if field is None:
        return []
    return [str(v) for t in _unwrap(field.annotation) if typing.get_origin(t) is Literal for v in typing.get_args(t)]


def _yaml_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_map(node: yaml.Node | None, path: tuple = ()) -> dict[tuple, int]:
    """Map every YAML path (tuple of keys / indices) to its 1-based line number."""
    if node is None:
        return {}
    out = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            out[(*path, key.value)] = key.start_mark.line + 1
            out |= {k: v for k, v in _line_map(value, (*path, key.value)).items() if k != (*path, key.value)}
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out |= _line_map(item, (*path, i))
    return out


def _nearest_line(lines: dict[tuple, int], loc: tuple) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None

