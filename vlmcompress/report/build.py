"""`build_report`: points from the folders' report.json, the numbers they lack measured, then the charts, the token
pictures, `report_data.json` and `index.html` written from the same dicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import VlmCompressError
from . import collect, layers, measure, pictures, plots
from .html import page
from .pareto import pareto_data
from .trace import input_dependent, shapes_rows, trace_images

COUNTED = "counted in this report (FlopCounterMode over one sample of the {} workload)"
MEASURED = ("measured in this report: {workload} workload at batch {batch_size}, {rounds} rounds interleaved with "
            "the report's other models, {threads} threads, median")


def build_report(dirs: list[str | Path], out: str | Path, base: str | None = None, eval_images: int = 4,
                 measure: bool = False) -> dict[str, Any]:
    """Write a report on `vlmcompress apply` outputs into `out/` and return `{"points": [...], "files": [...]}`.

    Args:
        dirs: apply output folders (one family).
        out: the report folder (created; files in it are replaced).
        base: the uncompressed model as one more point: a built-in name (`shapes-clip`), a folder or a Hub id.
        eval_images: images of the built-in shapes world that each token-reduced model runs on for the pictures
            and the per-image token counts (0: none).
        measure: measure every model's throughput now, interleaved, instead of reading report.json's.
    Raises:
        VlmCompressError: a folder that is not an apply output, folders of several families, a bad argument.
    """
    if isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images < 0:
        raise VlmCompressError(f"eval_images must be a whole number ≥ 0 (images per token picture); got "
                               f"{eval_images!r}; pass e.g. 4")
    outputs = collect.read_outputs(dirs)
    _check_out(out)  # before any model loads; the folder itself appears only once there is something to write
    notes: list[str] = []
    points, loaders = _points(outputs, base)
    specs = {p["name"]: _spec(o) for p, o in zip(points[-len(outputs):], outputs)}
    traces: dict[str, dict[str, Any]] = {}
    for p in points:
        _fill_from_model(p, loaders[p["name"]], specs.get(p["name"]), eval_images, outputs, traces, notes)
    _fill_throughput(points, loaders, measure, notes)
    for p in points:
        if p["accuracy"] is None:
            why = p.get("accuracy_not_measured") or (
                "no accuracy recorded or measured: the recipes have no data.eval (add e.g. data: {eval: {builtin: "
                "shapes, split: test}})")
            notes.append(f"{p['label']}: not on the Pareto plots: {why}")

    folder = _prepare(out)
    files: list[Path] = []
    charts: dict[str, str] = {}
    data = _charts(folder, points, outputs, base, traces, specs, files, charts)
    data |= {"points": points, "charts": charts,
             "token_pictures": pictures.write_token_pictures(folder, points, traces, specs, files, charts),
             "eval_images": eval_images, "measured_throughput": bool(measure), "notes": notes}
    files += [folder / "index.html", folder / "report_data.json"]
    data["files"] = [f.name for f in files]
    _write_json(folder / "report_data.json", data)
    recipes = {p["name"]: o.recipe_text for p, o in zip(points[-len(outputs):], outputs)}
    (folder / "index.html").write_text(page(data, recipes), encoding="utf-8")
    return {"points": points, "files": [str(f) for f in files]}


def _points(outputs: list[collect.Output], base: str | None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(the points: the base's first when given, then one per output; `{point name: what to load it from}`)."""
    points = [collect.point_from_report(o) for o in outputs]
    loaders = {p["name"]: str(o.folder) for p, o in zip(points, outputs)}
    if base is not None:
        base_point = _base_point(str(base), outputs)
        base_point["name"] = collect.unique_name(base_point["name"], {p["name"] for p in points})
        points.insert(0, base_point)
        loaders[base_point["name"]] = str(base)
    return points, loaders


def _charts(folder: Path, points, outputs, base, traces, specs, files: list[Path],
            charts: dict[str, str]) -> dict[str, Any]:
    """The Pareto plots and the per-layer charts with their JSON (each point gets its `on_front_<x>` flags);
    returns the charts' data for `report_data.json`."""
    metric = next((p["metric"] for p in points if p.get("metric")), None)
    out: dict[str, Any] = {}
    for key, label, lower in (("gflops", "GFLOPs per sample", True), ("throughput", "throughput (samples/s)", False)):
        data = pareto_data(points, key, lower, label, metric)
        for p, row in zip(points, data["points"]):
            p[f"on_front_{key}"] = row["on_front"]
        written, data["figure"] = plots.pareto_plot(data, folder / f"pareto_{key}")
        files += written + [_write_json(folder / f"pareto_{key}.json", data)]
        charts[f"pareto_{key}"] = f"pareto_{key}.png"
        out[f"pareto_{key}"] = data
    measured = {name: _per_image_counts(t) for name, t in traces.items()}
    tokens = layers.tokens_data(points, measured, {n: input_dependent(s) for n, s in specs.items()})
    written, tokens["figure"] = plots.tokens_plot(tokens, folder / "tokens_per_layer")
    files += written + [_write_json(folder / "tokens_per_layer.json", tokens)]
    sizes: dict[str, Any] = {}  # the base model's sizes, built once for all outputs compressed from it
    pruning = {"what": "attention heads / MLP neurons kept per layer against the sizes before pruning",
               "folders": [_pruning_entry(p, o, base, sizes) for p, o in zip(points[-len(outputs):], outputs)]}
    written, pruning["figure"] = plots.pruning_plot(pruning, folder / "pruning_per_layer")
    files += written + [_write_json(folder / "pruning_per_layer.json", pruning)]
    charts |= {"tokens_per_layer": "tokens_per_layer.png", "pruning_per_layer": "pruning_per_layer.png"}
    return out | {"tokens_per_layer": tokens, "pruning_per_layer": pruning}


def _check_out(out: str | Path) -> None:
    if Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise VlmCompressError(f"report output '{out}' is a file; expected a folder to write the report into; "
                               "give another --out")


def _prepare(out: str | Path) -> Path:
    folder = Path(out).expanduser()
    _check_out(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VlmCompressError(f"cannot create the report folder '{out}' ({e.strerror}); expected a writable "
                               "folder; give another --out") from None
    return folder


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _spec(output: collect.Output):
    from ..modeling.spec import TokenReductionSpec

    return TokenReductionSpec.read(output.config.get("token_reduction"))


def _base_point(base: str, outputs: list[collect.Output]) -> dict[str, Any]:
    """The base model's point: an apply output's own numbers when `base` is one, else the "before" numbers an
    output compressed from it recorded (None where none did: measured next)."""
    path = Path(base).expanduser()
    if path.is_dir() and (path / collect.REPORT).is_file():
        point = collect.point_from_report(collect.read_output(path), role="base")
        if point["family"] != outputs[0].family:
            raise VlmCompressError(f"base '{base}' is a {point['family']} model but the folders hold "
                                   f"{outputs[0].family} models; give a base of the same family")
        return point
    return collect.base_point_from_reports(base, outputs)


def _fill_from_model(point, source, spec, eval_images, outputs, traces, notes) -> None:
    """Load the point's model only when it is needed: GFLOPs or (base) accuracy / parameters missing, or token
    pictures to draw."""
    base = point["role"] == "base"
    data, seed = collect.eval_data(outputs)
    wants_accuracy = base and point["accuracy"] is None and data is not None
    wants_pictures = spec is not None and eval_images > 0
    if point["gflops"] is not None and not wants_accuracy and not wants_pictures and point["params_after"]:
        return
    from ..stages.base import count_params

    model, processor, adapter = measure.load(source)
    if adapter.family != point["family"]:
        raise VlmCompressError(f"base '{source}' is a {adapter.family} model but the folders hold "
                               f"{point['family']} models; give a base of the same family")
    if point["gflops"] is None:
        point["gflops"] = measure.gflops_per_sample(model, adapter)
        point["gflops_source"] = COUNTED.format(measure.first_workload(adapter.family).key)
    if not point["params_after"]:
        point["params_before"] = point["params_after"] = count_params(model)
    if wants_accuracy:
        scores = measure.accuracy_on(model, processor, adapter.family, data, seed)
        metric = collect.main_metric(adapter.family, scores)
        point["metric"], point["accuracy"] = metric, (scores or {}).get(metric)
        point["accuracy_source"] = f"measured in this report on {json.dumps(data)}" if scores else None
    if wants_pictures:
        if processor is None and adapter.family == "llava":
            notes.append(f"{point['label']}: no token pictures: the folder has no saved processor to build prompts")
        else:
            if processor is None:
                notes.append(f"{point['label']}: the folder has no saved processor; its token pictures run the "
                             "vision tower on the images scaled to [-1, 1] (the model's own normalisation is "
                             "unknown)")
            rows = shapes_rows(model, eval_images)
            traces[point["name"]] = {"rows": rows, "images": trace_images(model, processor, adapter, spec, rows),
                                     "grid": _grid(model), "algorithm": spec.algorithm}
    del model


def _grid(model) -> int:
    vision = getattr(model.config, "vision_config", model.config)
    return vision.image_size // vision.patch_size


def _fill_throughput(points, loaders, measure_all: bool, notes: list[str]) -> None:
    """Measure the throughput of every point (`measure_all`) or of those report.json holds none for, all in the
    same interleaved rounds."""
    wanted = [p for p in points if measure_all or p["throughput"] is None]
    if not wanted:
        return
    models = {}
    for p in wanted:
        model, _, adapter = measure.load(loaders[p["name"]])
        models[p["name"]] = (model, adapter)
    results = measure.interleaved_throughput(models)
    for p in wanted:
        r = results[p["name"]]
        p |= {"throughput": r["throughput"], "workload": r["workload"], "batch_size": r["batch_size"],
              "throughput_source": MEASURED.format(**r), "throughput_ms_all": r["ms_all"]}
    notes.append(f"throughput of {', '.join(p['label'] for p in wanted)}: " + MEASURED.format(**results[
        wanted[0]["name"]]) + "; interleaving spreads the machine's other load over all of them alike")


def _per_image_counts(trace: dict[str, Any]) -> dict[str, list[list[int]]]:
    counts: dict[str, list[list[int]]] = {}
    for image in trace["images"]:
        for component, per_layer in image["counts"].items():
            counts.setdefault(component, []).append(per_layer)
    return counts


def _pruning_entry(point, output, base: str | None, cache: dict[str, Any]) -> dict[str, Any]:
    """Kept sizes against the base model's (when the output was compressed from `base`), else against the output's
    own architecture before pruning."""
    if base is not None and collect.matches_base(output, str(base)):
        if str(base) not in cache:
            cache[str(base)] = layers.base_sizes(str(base))
        before, compared = cache[str(base)], f"base model {base}"
    else:
        before, compared = layers.unpruned_sizes(output.folder), "the output's architecture before pruning"
    return layers.pruning_entry(point["label"], point["name"], layers.output_sizes(output), before, compared)
