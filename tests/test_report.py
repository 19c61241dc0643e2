"""`vlmcompress.report.build_report` on two tiny apply outputs (ToMe, and pruning + ToMe) of shapes-clip-small with
its base: every file written, pictures of the right size that are not blank, JSON and HTML numbers equal to the
folders' report.json, the Pareto front against a brute-force reference, token pictures against the model's own
source maps; and the one-line error for a folder that is not an apply output."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from html.parser import HTMLParser  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import vlmcompress  # noqa: E402
from vlmcompress.errors import VlmCompressError  # noqa: E402
from vlmcompress.report import build_report, pareto_front  # noqa: E402
from vlmcompress.report.pictures import patch_groups  # noqa: E402

BASE = "shapes-clip-small"
EVAL = {"eval": {"builtin": "shapes", "split": "test", "size": 64}}
RECIPES = {"tome": [{"method": "token_reduce", "r": 2}],
           "prune-tome": [{"method": "structured_prune", "ratio": 0.5}, {"method": "token_reduce", "r": 2}]}
IMAGES = 3
CHARTS = ("pareto_gflops", "pareto_throughput", "tokens_per_layer", "pruning_per_layer")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(apply output folders, report folder, build_report's result), built once for the file."""
    root = tmp_path_factory.mktemp("report")
    dirs = []
    for name, stages in RECIPES.items():
        out = root / name
        vlmcompress.apply({"model": BASE, "output": str(out), "data": EVAL, "stages": stages}, progress=False)
        dirs.append(out)
    result = build_report(dirs, root / "report", base=BASE, eval_images=IMAGES)
    return dirs, root / "report", result


def read_json(path: Path):
    return json.loads(path.read_text())


def reports(dirs) -> dict[str, dict]:
    return {d.name: read_json(d / "report.json") for d in dirs}


def test_every_file_is_written_and_listed(built):
    dirs, out, result = built
    expected = {f"{c}.{ext}" for c in CHARTS for ext in ("png", "svg", "json")}
    expected |= {f"tokens_{d.name}.{ext}" for d in dirs for ext in ("png", "json")}
    expected |= {"tokens_side_by_side.png", "index.html", "report_data.json"}
    listed = {Path(f).name for f in result["files"]}
    assert expected <= listed
    for name in listed:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert read_json(out / "report_data.json")["files"] == [Path(f).name for f in result["files"]]


def test_pngs_have_the_recorded_size_and_are_not_blank(built):
    import matplotlib.image

    _, out, _ = built
    sizes = {f"{c}.png": read_json(out / f"{c}.json")["figure"] for c in CHARTS}
    sizes |= {f"tokens_{n}.png": read_json(out / f"tokens_{n}.json")["figure"] for n in RECIPES}
    assert sizes["pareto_gflops.png"] == {"width_px": 900, "height_px": 600}
    for name, size in sizes.items():
        pixels = matplotlib.image.imread(out / name)
        assert pixels.shape[:2] == (size["height_px"], size["width_px"]), name
        assert pixels.std() > 0, name
        colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
        assert len(colours) > 10, name  # more than a background and a frame


def test_svgs_parse_as_xml(built):
    _, out, _ = built
    for chart in CHARTS:
        root = ET.parse(out / f"{chart}.svg").getroot()
        assert root.tag.endswith("svg")
        assert len(list(root.iter())) > 20


def test_points_hold_the_numbers_of_report_json(built):
    dirs, out, result = built
    by_folder = reports(dirs)
    points = {p["name"]: p for p in read_json(out / "report_data.json")["points"]}
    assert set(points) == {BASE, *RECIPES} and [p["name"] for p in result["points"]] == list(points)
    first = by_folder["tome"]
    for name, report in by_folder.items():
        p = points[name]
        assert p["label"] == f"{name} ({' → '.join(s['method'] for s in RECIPES[name])})"
        assert p["accuracy"] == report["accuracy"]["after"]["recall@1"]
        assert p["accuracy_before"] == report["accuracy"]["before"]["recall@1"]
        assert p["gflops"] == report["speed"]["after"]["gflops_per_sample"]
        speed = report["speed"]["after"]
        assert p["throughput"] == pytest.approx(speed["batch_size"] * 1e3 / speed["ms_median"], rel=1e-4)
        assert (p["params_before"], p["params_after"]) == (report["params_before"], report["params_after"])
        assert p["tokens_per_layer"] == report["tokens_per_layer"]
    base = points[BASE]  # the "before" of the outputs compressed from it
    assert base["role"] == "base" and base["accuracy"] == first["accuracy"]["before"]["recall@1"]
    assert base["gflops"] == first["speed"]["before"]["gflops_per_sample"]
    assert base["params_after"] == first["params_before"]
    for chart, key in (("pareto_gflops", "gflops"), ("pareto_throughput", "throughput")):
        rows = {r["name"]: r for r in read_json(out / f"{chart}.json")["points"]}
        assert set(rows) == set(points)
        for name, r in rows.items():
            assert (r["accuracy"], r[key], r["label"]) == (points[name]["accuracy"], points[name][key],
                                                          points[name]["label"])


def brute_force_front(rows: list[dict], key: str, lower: bool) -> list[bool]:
    """Dominance checked pair by pair: q dominates p when it is no worse on both axes and better on one."""
    def no_worse(q, p):
        return q["accuracy"] >= p["accuracy"] and (q[key] <= p[key] if lower else q[key] >= p[key])

    def better(q, p):
        return q["accuracy"] > p["accuracy"] or (q[key] < p[key] if lower else q[key] > p[key])

    return [not any(no_worse(q, p) and better(q, p) for j, q in enumerate(rows) if j != i)
            for i, p in enumerate(rows)]


def test_pareto_front_equals_a_brute_force_reference(built):
    _, out, _ = built
    for chart, key, lower in (("pareto_gflops", "gflops", True), ("pareto_throughput", "throughput", False)):
        data = read_json(out / f"{chart}.json")
        assert data["lower_is_better"] is lower and data["x_key"] == key
        rows = data["points"]
        assert [r["on_front"] for r in rows] == brute_force_front(rows, key, lower)
        assert any(r["on_front"] for r in rows)


def test_pareto_front_on_hand_made_points():
    points = [{"accuracy": 0.9, "x": 10.0}, {"accuracy": 0.8, "x": 5.0}, {"accuracy": 0.8, "x": 6.0},
              {"accuracy": 0.9, "x": 10.0}, {"accuracy": 0.5, "x": 1.0}, {"accuracy": 0.95, "x": None},
              {"accuracy": 0.7, "x": 5.0}]
    assert pareto_front(points, "x", lower_is_better=True) == [True, True, False, True, True, False, False]
    usable = [p for p in points if p["x"] is not None]
    assert pareto_front(usable, "x", True) == brute_force_front(usable, "x", True)
    assert pareto_front(usable, "x", False) == brute_force_front(usable, "x", False)
    assert pareto_front(points, "x", lower_is_better=False) == [True, False, False, True, False, False, False]


class Page(HTMLParser):
    """Image sources, `<td data-key>` texts per table `data-name` (folder tables) and the `<pre>` texts."""

    def __init__(self):
        super().__init__()
        self.images, self.cells, self.pres, self.links = [], {}, [], []
        self._table, self._key, self._pre = None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("link", "script", "iframe") or attrs.get("href"):
            self.links.append((tag, attrs))
        if tag == "table" and attrs.get("class") == "folder":
            self._table = attrs["data-name"]
        if tag == "td" and self._table and "data-key" in attrs:
            self._key, self.cells[(self._table, attrs["data-key"])] = attrs["data-key"], ""
        if tag == "pre":
            self._pre = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        if tag == "td":
            self._key = None
        if tag == "pre":
            self.pres.append(self._pre)
            self._pre = None

    def handle_data(self, data):
        if self._key is not None:
            self.cells[(self._table, self._key)] += data
        if self._pre is not None:
            self._pre += data


def test_html_shows_every_picture_and_the_numbers_of_report_json(built):
    dirs, out, result = built
    page = Page()
    page.feed((out / "index.html").read_text())
    pngs = {Path(f).name for f in result["files"] if f.endswith(".png")}
    assert pngs <= set(page.images) and all((out / src).is_file() for src in page.images)
    assert not page.links  # self-contained: no stylesheet, script or link to fetch
    for d, report in reports(dirs).items():
        def cell(key, d=d):
            return page.cells[(d, key)]

        assert int(cell("params_before")) == report["params_before"]
        assert int(cell("params_after")) == report["params_after"]
        assert float(cell("accuracy")) == pytest.approx(report["accuracy"]["after"]["recall@1"], rel=1e-6)
        assert float(cell("accuracy_before")) == pytest.approx(report["accuracy"]["before"]["recall@1"], rel=1e-6)
        assert float(cell("gflops")) == pytest.approx(report["speed"]["after"]["gflops_per_sample"], rel=1e-5)
        speed = report["speed"]["after"]
        assert float(cell("throughput")) == pytest.approx(speed["batch_size"] * 1e3 / speed["ms_median"], rel=1e-4)
        assert [int(t) for t in cell("tokens_per_layer.vision").split(" → ")] == report["tokens_per_layer"]["vision"]
        assert (out.parent / d / "recipe.yaml").read_text() in page.pres
    assert float(page.cells[(BASE, "accuracy")]) == pytest.approx(
        reports(dirs)["tome"]["accuracy"]["before"]["recall@1"], rel=1e-6)


def test_token_pictures_colour_one_group_per_row_of_the_source_map(built):
    import torch

    from vlmcompress.data import load_rows
    from vlmcompress.data.schema import DataSource
    from vlmcompress.modeling.reduction import token_sources
    from vlmcompress.models import load_model

    dirs, out, _ = built
    for d in dirs:
        picture = read_json(out / f"tokens_{d.name}.json")
        images = picture["components"]["vision"]["images"]
        assert len(images) == IMAGES and picture["file"] == f"tokens_{d.name}.png"
        model, processor = load_model(str(d))  # the model's own source maps, on the same images
        rows = load_rows(DataSource(builtin="shapes", split="test"), model, 0, IMAGES)
        token_sources(model, trace=True)
        for row, groups in zip(rows, images):
            pixels = processor.image_processor(images=[row["image"]], return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                model.get_image_features(pixel_values=pixels)
            source = token_sources(model)["vision"][0]
            ids = np.array(groups["ids"])
            assert ids.shape == (8, 8)  # 32 px / patch 4
            assert groups["source_rows"] == source.shape[0] == groups["rows"]
            assert groups["rows"] == groups["patch_groups"] + groups["class_token_rows"]
            assert len(set(ids[ids >= 0].tolist())) == groups["patch_groups"]  # one colour per group
            assert groups["class_token_rows"] == 1 and groups["dropped_patches"] == 0  # ToMe merges, never drops
            patches = source[:, 1:]  # index 0 is the class token
            merged = int((patches.sum(dim=1) > 1).sum())
            assert groups["merged_groups"] == merged > 0
        declared = read_json(d / "report.json")["tokens_per_layer"]["vision"]
        assert images[0]["rows"] == declared[-1]


def test_per_layer_data(built):
    dirs, out, _ = built
    tokens = {e["name"]: e for e in read_json(out / "tokens_per_layer.json")["towers"]["vision"]}
    pruning = {e["name"]: e for e in read_json(out / "pruning_per_layer.json")["folders"]}
    for d in dirs:
        entry = tokens[d.name]
        assert entry["declared"] == read_json(d / "report.json")["tokens_per_layer"]["vision"]
        assert entry["per_image"] == [entry["declared"]] * IMAGES  # ToMe's counts do not depend on the image
        record = read_json(d / "config.json")["vlmcompress"]
        kept = pruning[d.name]["kept"]
        assert kept["layer_num_heads"] == record["layer_num_heads"]
        assert kept["layer_intermediate_sizes"] == record["layer_intermediate_sizes"]
        assert pruning[d.name]["before"]["layer_num_heads"]["vision"] == [4, 4]
    assert pruning["prune-tome"]["pruned"] and not pruning["tome"]["pruned"]


def test_patch_groups_of_a_hand_made_source_map():
    source = np.zeros((4, 5), dtype=bool)  # class token + a 2×2 grid
    source[0, 0] = True  # the class token alone
    source[1, [1, 4]] = True  # patches 0 and 3 merged
    source[2, 2] = True  # patch 1 kept; patch 2 dropped; row 3 is padding
    groups = patch_groups(source, 2)
    assert groups["ids"] == [[0, 1], [-1, 0]]
    assert (groups["rows"], groups["patch_groups"], groups["class_token_rows"]) == (3, 2, 1)
    assert (groups["merged_groups"], groups["dropped_patches"], groups["style"]) == (1, 1, "merge")
    with pytest.raises(ValueError):
        patch_groups(np.zeros((2, 7), dtype=bool), 2)


def test_a_folder_that_is_not_an_apply_output_is_a_one_line_error(tmp_path):
    folder = tmp_path / "not-an-output"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(VlmCompressError) as error:
        build_report([folder], tmp_path / "report")
    message = str(error.value)
    assert "\n" not in message and str(folder) in message and "report.json" in message
    assert "vlmcompress apply" in message
    assert not (tmp_path / "report").exists()  # nothing written for a bad input
