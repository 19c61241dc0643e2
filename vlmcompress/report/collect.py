"""Reading `vlmcompress apply` output folders into report points: JSON and YAML only (no torch, no model).

A point is one dict per folder (and one for the base model) holding every number the report shows; the plots, the
JSON files and `index.html` all read these same dicts, so what a picture shows and what a table says cannot differ.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VlmCompressError

REPORT = "report.json"
RECIPE = "recipe.yaml"
CONFIG = "config.json"
# the accuracy a point is ranked by, per family: what `vlmcompress.accuracy.measure` writes for it
MAIN_METRIC = {"clip": "recall@1", "siglip": "recall@1", "blip": "recall@1", "llava": "vqa_accuracy",
               "blip2": "vqa_accuracy"}
FALLBACK_METRICS = ("recall@1", "vqa_accuracy")
EXPECTED = "a folder written by `vlmcompress apply` (it holds config.json, report.json and recipe.yaml)"


@dataclass
class Output:
    """One `vlmcompress apply` output folder as read from disk. `name` is unique among the report's folders and
    safe in a file name (`tokens_<name>.png`)."""

    folder: Path
    name: str
    report: dict[str, Any]
    config: dict[str, Any]
    recipe_text: str | None
    recipe: dict[str, Any] | None

    @property
    def family(self) -> str:
        return self.report["family"]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VlmCompressError(f"'{path}' cannot be read as JSON ({type(e).__name__}: {str(e)[:120]}); expected "
                               f"the {what} of {EXPECTED}; re-run `vlmcompress apply` for it") from None
    if not isinstance(data, dict):
        raise VlmCompressError(f"'{path}' holds a JSON {type(data).__name__}, expected the {what} (a JSON object) of "
                               f"{EXPECTED}; re-run `vlmcompress apply` for it")
    return data


def read_output(folder: str | Path) -> Output:
    """The folder's `report.json`, `config.json` and `recipe.yaml`; raises `VlmCompressError` (one line) when
    `folder` is not an apply output."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise VlmCompressError(f"folder '{folder}' does not exist; expected {EXPECTED}; check the path")
    if not path.is_dir():
        raise VlmCompressError(f"'{folder}' is a file, not a folder; expected {EXPECTED}")
    if not (path / REPORT).is_file():
        raise VlmCompressError(f"'{folder}' is not a `vlmcompress apply` output: it has no {REPORT}; expected "
                               f"{EXPECTED}; give the apply output folders to report on")
    report = _read_json(path / REPORT, REPORT)
    missing = [k for k in ("family", "params_before", "params_after") if k not in report]
    if missing:
        raise VlmCompressError(f"'{path / REPORT}' lacks {', '.join(missing)}; expected the report.json of "
                               f"{EXPECTED}; re-run `vlmcompress apply` for it")
    config = _read_json(path / CONFIG, CONFIG) if (path / CONFIG).is_file() else {}
    text = (path / RECIPE).read_text() if (path / RECIPE).is_file() else None
    return Output(folder=path, name=path.resolve().name, report=report, config=config, recipe_text=text,
                  recipe=_parse_recipe(text))


def _parse_recipe(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # the recipe is shown as text; the label falls back to report.json's stages
    return data if isinstance(data, dict) else None


def read_outputs(dirs: list[str | Path]) -> list[Output]:
    """Every folder read and checked: at least one, all of one family; names made unique for file names."""
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    if not dirs:
        raise VlmCompressError("no folders given; expected one or more folders written by `vlmcompress apply`; "
                               "pass them as arguments: vlmcompress report OUT1 OUT2 --out report/")
    outputs = [read_output(d) for d in dirs]
    families = {o.family for o in outputs}
    if len(families) > 1:
        listed = ", ".join(f"{o.folder.name}: {o.family}" for o in outputs)
        raise VlmCompressError(f"the folders hold models of different families ({listed}); a report compares "
                               "outputs of one family (one accuracy metric); report each family separately")
    seen: set[str] = set()
    for o in outputs:
        o.name = unique_name(safe_name(o.name), seen)
    return outputs


def safe_name(name: str) -> str:
    """`name` with anything but letters, digits, `.`, `_` and `-` replaced by `-` (a file-name part)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "output"


def unique_name(name: str, seen: set[str]) -> str:
    """`name`, or `name-2`, `name-3`, ... when already in `seen` (which it is added to)."""
    candidate, i = name, 2
    while candidate in seen:
        candidate, i = f"{name}-{i}", i + 1
    seen.add(candidate)
    return candidate


def stage_methods(output: Output) -> list[str]:
    """The methods of the recipe's stages (`recipe.yaml`, else report.json's `stages`), in order."""
    stages = (output.recipe or {}).get("stages")
    if not isinstance(stages, list):
        stages = output.report.get("stages") or []
    return [str(s.get("method")) for s in stages if isinstance(s, dict) and s.get("method")]


def recipe_label(output: Output) -> str:
    """`folder-name (method → method → ...)`: how every picture and table names the output."""
    methods = stage_methods(output)
    return f"{output.folder.name} ({' → '.join(methods)})" if methods else output.folder.name


def main_metric(family: str, accuracy: dict[str, Any] | None) -> str | None:
    """The key of the accuracy a point is ranked by: the family's metric, else the first known one present."""
    if not accuracy:
        return MAIN_METRIC.get(family)
    preferred = MAIN_METRIC.get(family)
    if preferred in accuracy:
        return preferred
    return next((k for k in FALLBACK_METRICS if k in accuracy), preferred)


def throughput(speed: dict[str, Any] | None) -> float | None:
    """Samples per second of one `quick_speed` entry: `batch_size` samples per `ms_median` milliseconds."""
    if not speed or not speed.get("ms_median") or not speed.get("batch_size"):
        return None
    return round(speed["batch_size"] * 1e3 / speed["ms_median"], 4)


def _value(block: dict | None, key: str | None) -> float | None:
    value = (block or {}).get(key) if key else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _speed_part(speed: dict | None, side: str) -> dict[str, Any] | None:
    part = (speed or {}).get(side)
    return part if isinstance(part, dict) else None


def point_from_report(output: Output, role: str = "compressed") -> dict[str, Any]:
    """The point of an apply output: its numbers after compression, and before (the source model) beside them."""
    report = output.report
    accuracy = report.get("accuracy") or {}
    metric = main_metric(output.family, accuracy.get("after"))
    speed = report.get("speed")
    after, before = _speed_part(speed, "after"), _speed_part(speed, "before")
    where = f"{output.folder.name}/report.json"
    return {
        "label": recipe_label(output), "name": output.name, "folder": str(output.folder), "role": role,
        "family": output.family, "base_model": report.get("base_model"), "methods": stage_methods(output),
        "metric": metric,
        "accuracy": _value(accuracy.get("after"), metric), "accuracy_before": _value(accuracy.get("before"), metric),
        "accuracy_source": f"{where} accuracy.after" if accuracy.get("after") else None,
        "accuracy_not_measured": report.get("accuracy_not_measured"),
        "gflops": _value(after, "gflops_per_sample"), "gflops_before": _value(before, "gflops_per_sample"),
        "gflops_source": f"{where} speed.after.gflops_per_sample" if _value(after, "gflops_per_sample") else None,
        "throughput": throughput(after), "throughput_before": throughput(before),
        "throughput_source": f"{where} speed.after (batch_size / ms_median)" if throughput(after) else None,
        "workload": (after or {}).get("workload"), "batch_size": (after or {}).get("batch_size"),
        "params_before": report.get("params_before"), "params_after": report.get("params_after"),
        "params_ratio": report.get("params_ratio"), "world_size": report.get("world_size"),
        "tokens_per_layer": report.get("tokens_per_layer") or {},
    }


def matches_base(output: Output, base: str) -> bool:
    """Whether `output` was compressed from `base` (a built-in / Hub name, or a local folder recorded by its last
    part only)."""
    recorded = output.report.get("base_model")
    return recorded is not None and recorded in (base, Path(base).name)


def base_point_from_reports(base: str, outputs: list[Output]) -> dict[str, Any]:
    """The base model's point from the "before" numbers of the first output compressed from it (same model, same
    eval data, so its "before" is the base's measurement); values no output holds stay None for the caller to
    measure."""
    point: dict[str, Any] = {
        "label": f"{Path(base).name} (base)", "name": safe_name(Path(base).name), "folder": None, "role": "base",
        "family": outputs[0].family, "base_model": base, "methods": [],
        "metric": MAIN_METRIC.get(outputs[0].family), "accuracy": None, "accuracy_before": None,
        "accuracy_source": None, "accuracy_not_measured": None, "gflops": None, "gflops_before": None,
        "gflops_source": None, "throughput": None, "throughput_before": None, "throughput_source": None,
        "workload": None, "batch_size": None, "params_before": None, "params_after": None, "params_ratio": 1.0,
        "world_size": None, "tokens_per_layer": {},
    }
    source = next((o for o in outputs if matches_base(o, base)), None)
    if source is None:
        return point
    report, where = source.report, f"{source.folder.name}/report.json"
    accuracy = report.get("accuracy") or {}
    metric = main_metric(source.family, accuracy.get("before"))
    before = _speed_part(report.get("speed"), "before")
    point |= {"metric": metric, "accuracy": _value(accuracy.get("before"), metric),
              "gflops": _value(before, "gflops_per_sample"), "throughput": throughput(before),
              "workload": (before or {}).get("workload"), "batch_size": (before or {}).get("batch_size"),
              "params_before": report.get("params_before"), "params_after": report.get("params_before")}
    if point["accuracy"] is not None:
        point["accuracy_source"] = f"{where} accuracy.before"
    if point["gflops"] is not None:
        point["gflops_source"] = f"{where} speed.before.gflops_per_sample"
    if point["throughput"] is not None:
        point["throughput_source"] = f"{where} speed.before (batch_size / ms_median)"
    return point


def eval_data(outputs: list[Output]) -> tuple[dict[str, Any] | None, int]:
    """(`accuracy.data` of the first output that measured accuracy, its recipe's seed): the data a base model
    without a recorded measurement is scored on, so that its accuracy compares with the outputs'."""
    for o in outputs:
        data = (o.report.get("accuracy") or {}).get("data")
        if isinstance(data, dict):
            return data, int((o.recipe or {}).get("seed") or 0)
    return None, 0
