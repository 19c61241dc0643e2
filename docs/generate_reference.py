"""Generate docs/recipe-reference.md from the recipe schema: `python docs/generate_reference.py`.

tests/test_docs.py checks that the committed file matches what this script writes.
"""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from vlmcompress.recipe import DataSource, DataSpec, Recipe
from vlmcompress.registry import list_methods

TARGET = Path(__file__).parent / "recipe-reference.md"


def _type_name(t) -> str:
    """A short, readable rendering of a type annotation (`0 ≤ float < 1 | {component: ...}`)."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Annotated:
        metas = [x for m in args[1:] for x in (m, *getattr(m, "metadata", []))]
        bounds = [f"{k} {getattr(m, k)}" for m in metas for k in ("ge", "gt", "le", "lt")
                  if getattr(m, k, None) is not None]
        ops = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
        bounds = [f"{ops[b.split()[0]]} {b.split()[1]}" for b in bounds]
        return _type_name(args[0]) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is tuple:
        return f"[{', '.join(_type_name(a) for a in args)}]"
    if origin is dict:
        return f"{{{_type_name(args[0])}: {_type_name(args[1])}}}"
    if t is type(None):
        return "null"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return "stage" if t.__name__ == "StageConfig" else t.__name__
    return getattr(t, "__name__", str(t))


def _models_in(t) -> list[type[BaseModel]]:
    """The schema classes inside an annotation (`TrainConfig`, `LoraConfig | None`), stages excluded."""
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [] if t.__name__ == "StageConfig" else [t]
    return [m for a in typing.get_args(t) for m in _models_in(a)]


def _table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        default = "required" if field.is_required() else f"`{field.get_default(call_default_factory=True)!r}`"
        kind = _type_name(field.annotation)
        description = (field.description or "").replace("|", "\\|")  # a | would end the table cell
        rows.append(f"| `{name}` | `{kind}` | {default} | {description} |")
    return rows


def render() -> str:
    lines = ["# Recipe reference", "",
             "Generated from the schema by `python docs/generate_reference.py`; do not edit by hand.", "",
             "Unknown keys are errors (they name the file, line, YAML path and the nearest valid key). Selectors are "
             "exact module names or `re:` regular expressions matched against the full module name. Components "
             "are `vision`, `text`, `qformer`, `projector`, `llm`.", "", "## Top level", "", *_table(Recipe), "",
             "## `data`", "", *_table(DataSpec), "", "### a data source (`data.train`, `data.eval`)", "",
             *_table(DataSource), "", "## Stages", ""]
    for entry in list_methods():
        lines += [f"### `method: {entry.name}`", "", entry.config_cls.__doc__.strip(), "",
                  *_table(entry.config_cls), ""]
        for name, field in entry.config_cls.model_fields.items():  # nested blocks (`train:`, `lora:`, ...)
            for block in _models_in(field.annotation):
                lines += [f"#### `{entry.name}.{name}` ({block.__name__})", "", inspect.cleandoc(block.__doc__ or ""), "",
                          *_table(block), ""]
        choices = entry.config_cls.choices()
        if choices is None:
            continue
        key, classes = choices
        lines += [f"`{key}:` chooses one of {', '.join(f'`{n}`' for n in classes)} (default "
                  f"`{entry.config_cls.model_fields[key].default}`); each adds its own keys:", ""]
        for name, cls in classes.items():
            own = tuple(entry.config_cls.model_fields)
            lines += [f"#### `{key}: {name}`", "", (cls.__doc__ or "").strip().split("\n")[0], ""]
            if any(f not in own for f in cls.model_fields):
                lines += [*_table(cls, skip=own), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
