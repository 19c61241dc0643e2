"""`index.html`: one self-contained page (pictures are files beside it, referenced by relative name; no network, no
external CSS or JavaScript) showing the report's points, charts and pictures.

Every number on the page is read from the point dicts that `report_data.json` holds and written by `cell` with one
format (`number_text`): a table cell carries its key (`data-key`) and its table the point's `name` (`data-name`), so
a reader (or a test) can match each cell to its JSON value. Every piece of text goes through `html.escape`.
"""

from __future__ import annotations

from html import escape
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
section { border-top: 2px solid #eee; margin-top: 2em; }
"""

# (key in the point dict, row title) of every folder's table, in order
FOLDER_ROWS = (("role", "role"), ("base_model", "base model"), ("params_before", "parameters before"),
               ("params_after", "parameters after"), ("params_ratio", "parameters after / before"),
               ("gflops_before", "GFLOPs per sample before"), ("gflops", "GFLOPs per sample"),
               ("metric", "accuracy metric"), ("accuracy_before", "accuracy before"), ("accuracy", "accuracy"),
               ("throughput_before", "throughput before (samples/s)"), ("throughput", "throughput (samples/s)"),
               ("workload", "timed workload"), ("batch_size", "timed batch size"), ("world_size", "processes"),
               ("accuracy_source", "accuracy from"), ("gflops_source", "GFLOPs from"),
               ("throughput_source", "throughput from"), ("accuracy_not_measured", "accuracy not measured"))
OVERVIEW = (("role", "role"), ("accuracy", "accuracy"), ("gflops", "GFLOPs"), ("throughput", "samples/s"),
            ("params_after", "parameters"), ("on_front_gflops", "on GFLOPs front"),
            ("on_front_throughput", "on throughput front"))


def number_text(value: Any) -> str:
    """The one text form of a value on the page: integers as they are, floats to 6 significant digits, lists
    joined by arrows, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, (list, tuple)):
        return " → ".join(number_text(v) for v in value)
    return str(value)


def cell(key: str, value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    kind = ' class="num"' if numeric else ""
    return f'<td data-key="{escape(key)}"{kind}>{escape(number_text(value))}</td>'


def image(file: str, alt: str) -> str:
    return f'<img src="{escape(file)}" alt="{escape(alt)}">'


def overview_table(points: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{escape(title)}</th>" for _, title in OVERVIEW)
    rows = [f'<tr data-name="{escape(p["name"])}"><td>{escape(p["label"])}</td>'
            + "".join(cell(key, p.get(key)) for key, _ in OVERVIEW) + "</tr>" for p in points]
    return f'<table class="overview"><tr><th>recipe</th>{head}</tr>{"".join(rows)}</table>'


def folder_table(point: dict[str, Any]) -> str:
    rows = [f"<tr><th>{escape(title)}</th>{cell(key, point.get(key))}</tr>" for key, title in FOLDER_ROWS]
    for component, tokens in (point.get("tokens_per_layer") or {}).items():
        rows.append(f"<tr><th>{escape(f'tokens per layer ({component})')}</th>"
                    f"{cell(f'tokens_per_layer.{component}', list(tokens))}</tr>")
    if not point.get("tokens_per_layer"):
        rows.append(f"<tr><th>tokens per layer</th>{cell('tokens_per_layer', 'no token reduction')}</tr>")
    return f'<table class="folder" data-name="{escape(point["name"])}">{"".join(rows)}</table>'


def folder_section(point: dict[str, Any], picture: dict[str, Any] | None, recipe_text: str | None) -> str:
    parts = [f'<section id="{escape(point["name"])}"><h3>{escape(point["label"])}</h3>']
    if point.get("folder"):
        parts.append(f'<p class="note">folder: {escape(point["folder"])}</p>')
    parts.append(folder_table(point))
    if picture is not None:
        if picture.get("file"):
            parts.append(f"<h4>What the token reduction did</h4>{image(picture['file'], point['label'])}")
        for note in picture.get("notes", []):
            parts.append(f'<p class="note">{escape(note)}</p>')
    if recipe_text is not None:
        parts.append(f"<h4>recipe.yaml</h4><pre>{escape(recipe_text)}</pre>")
    return "".join(parts) + "</section>"


def page(data: dict[str, Any], recipes: dict[str, str | None]) -> str:
    """The whole page from `report_data.json`'s dict (`recipes`: the recipe.yaml text per point name)."""
    points = data["points"]
    metric = next((p["metric"] for p in points if p.get("metric")), "accuracy")
    charts = data["charts"]
    intro = (f"{len(points)} models, ranked by {escape(metric)}. Numbers come from each folder's report.json unless "
             "a row says where else; every picture is a file beside this page, its data in the JSON file of the same "
             "name (the side-by-side picture: the tokens_&lt;folder&gt;.json files) and in report_data.json.")
    body = [f"<h1>vlmcompress report</h1><p>{intro}</p>",
            "<h2>Accuracy against cost</h2>",
            image(charts["pareto_gflops"], "Pareto plot: accuracy against GFLOPs"),
            image(charts["pareto_throughput"], "Pareto plot: accuracy against throughput"),
            overview_table(points),
            "<h2>Per layer</h2>",
            image(charts["tokens_per_layer"], "tokens per layer"),
            image(charts["pruning_per_layer"], "heads and MLP neurons kept per layer")]
    if charts.get("tokens_side_by_side"):
        legend = ("One row per image of the built-in shapes world, one column per output: every group of merged "
                  "patches has one colour and a white outline, a patch left alone is tinted faintly; dropped "
                  "patches are grey and hatched; a method that only keeps or drops tokens shows kept patches as "
                  "they are.")
        body += ["<h2>What the token reduction did, side by side</h2>", f'<p class="note">{legend}</p>',
                 image(charts["tokens_side_by_side"], "token pictures side by side")]
    body.append("<h2>Models</h2>")
    pictures = data.get("token_pictures", {})
    for p in points:
        body.append(folder_section(p, pictures.get(p["name"]), recipes.get(p["name"])))
    if data.get("notes"):
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in data["notes"]) + "</ul>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>vlmcompress report</title>'
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
