"""What the token reduction did to an image: every group of merged patches in one colour, dropped patches greyed
and hatched. `patch_groups` turns a source map into the patch grid's group ids (pure numpy); the drawing functions
turn those into figures (matplotlib, imported inside them); `write_token_pictures` writes `tokens_<name>.png` /
`.json` per output and `tokens_side_by_side.png`.

A source map `[N', N0]` says which of the tower's `N0` input tokens each of its `N'` output tokens holds: a merged
group, or one-hot rows for kept tokens; a dropped token appears in no row. `N0` is the patch grid (`(image_size /
patch_size)²`, row-major), after a class token at index 0 for CLIP-like towers (`N0 = grid² + 1`).
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path
from typing import Any

import numpy as np

PANEL_INCHES = 2.4  # one image panel
DPI = 100
DROPPED = -1

PICTURED = ("vision", "llm")  # towers over image patches; a text tower's tokens have no picture
NOTES = {
    "visionzip": "VisionZip's source map records the patch each kept token stands at, not what its contextual "
                 "tokens absorbed: merged tokens show at one patch each, the rest as dropped",
    "prumerge": "PruMerge's source map records the patch each kept token stands at, not the neighbours it "
                "absorbed: kept patches are shown, the absorbed and dropped ones greyed",
    "fastv": "FastV drops image tokens inside the language model after decoder layer K: the picture shows the "
             "image patches whose tokens the language model kept after layer K (its kept prompt positions that hold "
             "an image placeholder), for the image's question; the vision tower itself keeps every patch",
}


def patch_groups(source: np.ndarray, grid: int) -> dict[str, Any]:
    """The group of every patch, from a source map.

    Args:
        source: `[N', N0]` bool, `N0` = `grid²` (no class token) or `grid² + 1` (class token at index 0).
        grid: patches per side.
    Returns:
        `{"grid", "ids": [grid][grid] ints (the group, numbered 0.. in row order, or -1 for a dropped patch),
        "rows": N' rows that hold any token, "patch_groups": rows holding at least one patch (each coloured),
        "class_token_rows": rows holding only the class token, "merged_groups": groups of two patches or more,
        "dropped_patches", "kept_patches", "style": "merge" when any group holds two patches, else "keep"}`.
    Raises:
        ValueError: `N0` fits neither layout.
    """
    source = np.asarray(source, dtype=bool)
    offset = source.shape[1] - grid * grid
    if offset not in (0, 1):
        raise ValueError(f"a source map over {source.shape[1]} tokens does not fit a {grid}×{grid} patch grid "
                         "(with or without a class token)")
    ids = np.full(grid * grid, DROPPED, dtype=int)
    sizes: list[int] = []
    non_patch = 0
    for row in source:
        if not row.any():
            continue  # a padding row (per-image counts padded to the batch's longest): holds nothing
        patches = np.flatnonzero(row[offset:])
        if patches.size == 0:
            non_patch += 1
            continue
        ids[patches] = len(sizes)
        sizes.append(int(patches.size))
    dropped = int((ids == DROPPED).sum())
    return {"grid": grid, "ids": ids.reshape(grid, grid).tolist(), "rows": len(sizes) + non_patch,
            "patch_groups": len(sizes), "class_token_rows": non_patch,
            "merged_groups": sum(1 for s in sizes if s > 1), "dropped_patches": dropped,
            "kept_patches": grid * grid - dropped, "style": "merge" if any(s > 1 for s in sizes) else "keep"}


def group_colours(count: int) -> np.ndarray:
    """`[count, 3]` RGB in 0..1, hues a golden-ratio step apart (neighbouring group numbers look different)."""
    return np.array([colorsys.hsv_to_rgb((i * 0.6180339887) % 1.0, 0.8, 0.95) for i in range(count)]).reshape(-1, 3)


def overlay(image: np.ndarray, groups: dict[str, Any], alpha: float = 0.6, single_alpha: float = 0.18) -> np.ndarray:
    """`[S, S, 3]` float RGB: the image with each group's patches tinted in its colour ("merge" style; a "keep"
    picture leaves kept patches as they are) and dropped patches grey. A group of one patch (a token that was
    neither merged nor dropped) is tinted faintly, so that the merged groups stand out.

    Args:
        image: `[S, S, 3]` uint8, `S` a multiple of the grid (else the patch cells are rounded).
    """
    image = np.asarray(image, dtype=float) / 255.0
    size = image.shape[0]
    ids = np.asarray(groups["ids"])
    cell = np.minimum((np.arange(size) * groups["grid"]) // size, groups["grid"] - 1)
    pixel_ids = ids[cell[:, None], cell[None, :]]  # [S, S] group of every pixel
    out = image.copy()
    if groups["style"] == "merge" and groups["patch_groups"]:
        colours = group_colours(groups["patch_groups"])
        sizes = np.bincount(ids[ids >= 0].ravel(), minlength=groups["patch_groups"])
        kept = pixel_ids >= 0
        weight = np.where(sizes[np.maximum(pixel_ids, 0)] > 1, alpha, single_alpha)[kept][:, None]
        out[kept] = (1 - weight) * image[kept] + weight * colours[pixel_ids[kept]]
    dropped = pixel_ids == DROPPED
    out[dropped] = 0.35 * image[dropped] + 0.65 * 0.55  # greyed: the image faint under grey
    return out


def boundaries(ids: np.ndarray) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Line segments (in patch units, x right / y down) between neighbouring patches of different groups where
    either holds two patches or more (the outline of every merged group; single patches get no grid lines)."""
    ids = np.asarray(ids)
    g = ids.shape[0]
    sizes = np.bincount(ids[ids >= 0].ravel(), minlength=1)
    merged = np.where(ids >= 0, sizes[np.maximum(ids, 0)] > 1, False)
    segments = []
    for y in range(g):
        for x in range(g):
            if x + 1 < g and ids[y, x] != ids[y, x + 1] and (merged[y, x] or merged[y, x + 1]):
                segments.append(((x + 1, y), (x + 1, y + 1)))
            if y + 1 < g and ids[y, x] != ids[y + 1, x] and (merged[y, x] or merged[y + 1, x]):
                segments.append(((x, y + 1), (x + 1, y + 1)))
    return segments


def draw_panel(ax, image: np.ndarray, groups: dict[str, Any] | None, title: str) -> None:
    """One panel: the image alone (`groups` None) or its token picture, patch grid in patch units."""
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle

    g = groups["grid"] if groups else 1
    shown = image if groups is None else overlay(image, groups)
    ax.imshow(shown, extent=(0, g, g, 0), interpolation="nearest")
    if groups is not None:
        ids = np.asarray(groups["ids"])
        ax.add_collection(LineCollection(boundaries(ids), colors="white", linewidths=0.8))
        for y, x in zip(*np.nonzero(ids == DROPPED)):
            ax.add_patch(Rectangle((x, y), 1, 1, fill=False, hatch="///", edgecolor="0.25", linewidth=0))
    ax.set_xlim(0, g)
    ax.set_ylim(g, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def panel_title(component: str, groups: dict[str, Any]) -> str:
    if groups["style"] == "merge":
        return (f"{component}: {groups['patch_groups']} groups ({groups['merged_groups']} merged), "
                f"{groups['dropped_patches']} dropped")
    return f"{component}: {groups['kept_patches']} kept, {groups['dropped_patches']} dropped"


def figure_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure of `rows × cols` panels."""
    return round(cols * PANEL_INCHES * DPI), round(rows * (PANEL_INCHES + 0.3) * DPI)


def draw_grid(path, images: list[np.ndarray], columns: list[tuple[str, list[dict[str, Any] | None], list]],
              captions: list[str]) -> tuple[int, int]:
    """A figure with one row per image: the original, then one panel per column (`(name, groups per image, the
    image each picture is drawn on)`: a column's model may see the image at another size; groups None where that
    column has no picture for the image); saved to `path` (PNG). Returns its (width, height) pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(images), 1 + len(columns)
    width, height = figure_size(rows, cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    try:
        for i, image in enumerate(images):
            draw_panel(axes[i][0], image, None, _short(captions[i]))
            for j, (name, per_image, drawn_on) in enumerate(columns):
                groups = per_image[i] if i < len(per_image) else None
                ax = axes[i][j + 1]
                if groups is None:
                    ax.axis("off")
                    ax.text(0.5, 0.5, "no picture", ha="center", va="center", fontsize=7, transform=ax.transAxes)
                    continue
                draw_panel(ax, drawn_on[i], groups, f"{_short(name, 40)}\n{panel_title(groups['component'], groups)}")
        fig.subplots_adjust(left=0.02, right=0.98, top=0.93, bottom=0.02, wspace=0.08, hspace=0.35)
        fig.savefig(path, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return width, height


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def groups_per_image(trace: dict[str, Any], component: str, notes: list[str]) -> list[dict[str, Any] | None]:
    """`patch_groups` of one tower's source map for every traced image (None where it has none or it does not
    fit the patch grid, said in `notes`), with the map's own size beside them."""
    per_image: list[dict[str, Any] | None] = []
    for i, image in enumerate(trace["images"]):
        source = image["sources"].get(component)
        groups = None
        if source is not None:
            try:
                groups = patch_groups(source, trace["grid"]) | {
                    "component": component, "source_rows": int(source.shape[0]),
                    "source_tokens": int(source.shape[1])}
            except ValueError as e:
                notes.append(f"{component}, image {i}: {e}")
        per_image.append(groups)
    return per_image


def write_token_pictures(folder: Path, points, traces, specs, files: list[Path],
                         charts: dict[str, str]) -> dict[str, Any]:
    """`tokens_<name>.png` and `.json` for every token-reduced output that ran, and `tokens_side_by_side.png`."""
    out: dict[str, Any] = {}
    side: list[tuple[str, list, list]] = []
    first_rows = None
    for p in points:
        spec, trace = specs.get(p["name"]), traces.get(p["name"])
        if spec is None:
            continue
        entry: dict[str, Any] = {"algorithm": spec.algorithm, "file": None, "components": {}, "notes": []}
        if spec.algorithm in NOTES:
            entry["notes"].append(NOTES[spec.algorithm])
        other = sorted({t.component for t in spec.towers} - set(PICTURED))
        if other:
            entry["notes"].append(f"reduced {', '.join(other)} tokens have no picture (they are not image patches)")
        if trace is None:
            entry["notes"].append("not run on images (eval_images is 0, or a LLaVA folder without a saved processor to build prompts)")
            out[p["name"]] = entry
            continue
        images = [r["image"] for r in trace["rows"]]
        columns = []
        for component in PICTURED:
            per_image = groups_per_image(trace, component, entry["notes"])
            if any(g is not None for g in per_image):
                entry["components"][component] = {"grid": trace["grid"], "images": per_image}
                columns.append((p["label"], per_image, images))
            elif any(t.component == component for t in spec.towers):
                entry["notes"].append(f"{component}: the model recorded no source map ({spec.algorithm})")
        if columns:
            path = folder / f"tokens_{p['name']}.png"
            width, height = draw_grid(path, images, columns, [r["text"] for r in trace["rows"]])
            entry |= {"file": path.name, "json": f"tokens_{p['name']}.json",
                      "figure": {"width_px": width, "height_px": height},
                      "captions": [r["text"] for r in trace["rows"]]}
            (folder / entry["json"]).write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
            files += [path, folder / entry["json"]]
            side.append(columns[0])
            first_rows = first_rows or trace["rows"]
        out[p["name"]] = entry
    if side:
        path = folder / "tokens_side_by_side.png"
        draw_grid(path, [r["image"] for r in first_rows], side, [r["text"] for r in first_rows])
        files.append(path)
        charts["tokens_side_by_side"] = path.name
    return out
