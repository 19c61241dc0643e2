"""The charts of a report, drawn from the same dicts that are written beside them as JSON: Pareto plots, tokens per
layer, heads / MLP neurons kept per layer. Each is saved as PNG and SVG at a fixed size in pixels (`SIZES`), which
the JSON records (`figure`), so a reader can check the pictures. matplotlib is imported inside the functions
(Agg backend), so that importing vlmcompress stays light."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from ..errors import BackendNotInstalledError
from .pareto import front_line

DPI = 100
SIZES = {"pareto": (900, 600)}  # pixels; the per-layer charts grow with their panels (`panel_size`)
BASE_MARKER, POINT_MARKER = "*", "o"
MARKERS = ("o", "s", "^", "D", "v", "P")


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError:
        raise BackendNotInstalledError("matplotlib", "plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, stem: Path) -> list[Path]:
    """`stem.png` and `stem.svg` at the figure's size (no tight bounding box: the size stays what was asked)."""
    files = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(files[0], dpi=DPI, format="png")
    fig.savefig(files[1], format="svg")
    return files


def figure_of(plt, width: int, height: int, rows: int = 1, cols: int = 1):
    fig, axes = plt.subplots(rows, cols, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    return fig, axes


def wrap_label(label: str, width: int = 34) -> str:
    """A recipe label on a few lines: the folder name, then its methods."""
    name, _, methods = label.partition(" (")
    lines = textwrap.wrap(name, width) or [name]
    if methods:
        lines += textwrap.wrap("(" + methods, width)
    return "\n".join(lines)


def pareto_plot(data: dict[str, Any], stem: Path) -> tuple[list[Path], dict[str, int]]:
    """Accuracy against `data["x_key"]`: every point labelled with its recipe, the front drawn as a staircase."""
    plt = pyplot()
    width, height = SIZES["pareto"]
    fig, axes = figure_of(plt, width, height)
    ax = axes[0][0]
    x_key, rows = data["x_key"], [r for r in data["points"] if r["label"] not in data["left_out"]]
    try:
        for r in rows:
            base = r["role"] == "base"
            ax.scatter([r[x_key]], [r["accuracy"]], s=160 if base else 60, marker=BASE_MARKER if base else POINT_MARKER,
                       facecolors="tab:red" if r["on_front"] else "white", edgecolors="tab:red", zorder=3,
                       linewidths=1.5)
        line = front_line(rows, x_key, data["lower_is_better"])
        if line:
            ax.step([p[0] for p in line], [p[1] for p in line], where="post", color="tab:red", alpha=0.6, lw=1.2,
                    label="Pareto front", zorder=2)
        ax.scatter([], [], marker=BASE_MARKER, facecolors="white", edgecolors="tab:red", label="base model")
        ax.scatter([], [], marker=POINT_MARKER, facecolors="tab:red", edgecolors="tab:red", label="on the front")
        ax.scatter([], [], marker=POINT_MARKER, facecolors="white", edgecolors="tab:red", label="dominated")
        # above the axes, so that it covers no point and no label
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
        ax.margins(0.25, 0.2)
        if ax.get_xlim()[0] < 0:  # GFLOPs and samples/s are never negative: no axis below 0 from the margins
            ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        better = "lower is better" if data["lower_is_better"] else "higher is better"
        ax.set_xlabel(f"{data['x_label']} ({better})")
        ax.set_ylabel(data["metric"] or "accuracy")
        fig.suptitle(f"{data['metric'] or 'accuracy'} against {data['x_label']}", fontsize=11, y=0.98)
        fig.subplots_adjust(left=0.09, right=0.97, top=0.88, bottom=0.1)
        place_labels(fig, ax, [(r[x_key], r["accuracy"], wrap_label(r["label"])) for r in rows])
        if not rows:
            ax.text(0.5, 0.5, f"nothing to draw: no model has both an accuracy and a {data['x_label']}",
                    ha="center", va="center", transform=ax.transAxes)
        if data["left_out"]:
            fig.text(0.01, 0.01, "not drawn (no number): " + "; ".join(data["left_out"]), fontsize=7)
        files = save(fig, stem)
    finally:
        plt.close(fig)
    return files, {"width_px": width, "height_px": height}


# label offsets (points) tried in turn: close to the point first, then further out
OFFSETS = [(dx * d, dy * d) for d in (10, 28, 48, 70) for dx, dy in ((1, 1), (-1, 1), (1, -1), (-1, -1), (0, 1.4),
                                                                    (0, -1.4))]


def place_labels(fig, ax, items: list[tuple[float, float, str]]) -> None:
    """Annotate each `(x, y, text)` at the first offset where the text overlaps no label placed before, no
    marker and stays inside the axes (else at the offset with the least overlap): labels of nearby points do not
    cover each other."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    ax.get_xlim(), ax.get_ylim()  # settle the autoscaled limits first: placement works in pixels
    markers = []
    for x, y, _ in items:
        px, py = ax.transData.transform((x, y))
        markers.append((px - 7, py - 7, px + 7, py + 7))
    frame = ax.get_window_extent(renderer)
    placed: list[tuple[float, float, float, float]] = []
    for x, y, text in items:
        best = None
        for dx, dy in OFFSETS:
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                               ha="left" if dx > 0 else "right" if dx < 0 else "center",
                               va="bottom" if dy > 0 else "top",
                               arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6})
            box = Text.get_window_extent(note, renderer)  # the text alone, not its arrow back to the point
            extent = (box.x0, box.y0, box.x1, box.y1)
            outside = (box.x0 < frame.x0) + (box.x1 > frame.x1) + (box.y0 < frame.y0) + (box.y1 > frame.y1)
            cost = sum(_overlap(extent, other) for other in placed + markers) + 1e6 * outside
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, note, extent)
            else:
                note.remove()
            if cost == 0:
                break
        placed.append(best[2])


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Area shared by two boxes `(x0, y0, x1, y1)`."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def panel_size(rows: int, cols: int, panel: tuple[int, int] = (560, 400)) -> tuple[int, int]:
    """(width, height) pixels of a chart of `rows × cols` panels."""
    return panel[0] * max(cols, 1), panel[1] * max(rows, 1) + 60


def tokens_plot(data: dict[str, Any], stem: Path) -> tuple[list[Path], dict[str, int]]:
    """Tokens per layer, one panel per tower, one line per output; a min–max band and the median where the model
    was run on the eval images and its tokens depend on them."""
    plt = pyplot()
    towers = data["towers"]
    width, height = panel_size(1, len(towers))
    fig, axes = figure_of(plt, width, height, 1, max(len(towers), 1))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    try:
        if not towers:
            axes[0][0].axis("off")
            axes[0][0].text(0.5, 0.5, "no token reduction in these outputs", ha="center", va="center")
        for ax, (component, entries) in zip(axes[0], towers.items()):
            for i, e in enumerate(entries):
                colour = colours[i % len(colours)]
                layers = list(range(len(e["declared"])))
                # outputs with the same counts overlap: shrinking markers and widths keep each one visible
                ax.plot(layers, e["declared"], marker=MARKERS[i % len(MARKERS)], ms=max(7 - 1.5 * i, 3),
                        lw=max(2.5 - 0.5 * i, 1), color=colour, label=wrap_label(e["label"], 40))
                if e["input_dependent"] and e["min"] is not None:
                    depth = range(len(e["min"]))
                    ax.fill_between(depth, e["min"], e["max"], color=colour, alpha=0.2, lw=0)
                    ax.plot(depth, e["median"], ls="--", color=colour, lw=1,
                            label=f"median, min–max over {len(e['per_image'])} images")
            if entries:
                ax.axhline(entries[0]["declared"][0], ls=":", color="0.5", lw=1, label="no reduction")
            _integer_axes(ax)
            ax.set_title(f"{component}: tokens per layer", fontsize=10)
            ax.set_xlabel("layer (0: entering the first layer; i: after layer i)")
            ax.set_ylabel("tokens")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.subplots_adjust(left=0.12 / max(len(towers), 1), right=0.98, top=0.9, bottom=0.14, wspace=0.3)
        files = save(fig, stem)
    finally:
        plt.close(fig)
    return files, {"width_px": width, "height_px": height}


def pruning_plot(data: dict[str, Any], stem: Path) -> tuple[list[Path], dict[str, int]]:
    """Heads (top row) and MLP neurons (bottom row) kept per layer, one panel per component, bars per output; the
    sizes before pruning as grey outlines."""
    from .layers import KINDS

    plt = pyplot()
    entries = data["folders"]
    components = list(dict.fromkeys(c for e in entries for kind in KINDS for c in e["before"].get(kind, {})))
    width, height = panel_size(len(KINDS), len(components))
    fig, axes = figure_of(plt, width, height, len(KINDS), max(len(components), 1))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    try:
        if not components:
            for row in axes:
                row[0].axis("off")
            axes[0][0].text(0.5, 0.5, "no per-layer sizes", ha="center", va="center")
        bar = 0.8 / max(len(entries), 1)
        for r, (kind, title) in enumerate(KINDS.items()):
            for c, component in enumerate(components):
                ax = axes[r][c]
                for i, e in enumerate(entries):
                    before = e["before"].get(kind, {}).get(component, [])
                    kept = e["kept"].get(kind, {}).get(component, [])
                    xs = [x - 0.4 + bar * (i + 0.5) for x in range(len(kept))]
                    ax.bar(xs, kept, width=bar, color=colours[i % len(colours)], label=wrap_label(e["label"], 40))
                    ax.bar(xs[: len(before)], before[: len(xs)], width=bar, fill=False, edgecolor="0.5", lw=0.8)
                _integer_axes(ax)
                depth = max((len(e["before"].get(kind, {}).get(component, [])) for e in entries), default=0)
                ax.set_xticks(range(depth))
                ax.set_title(f"{component}: {title} kept per layer", fontsize=10)
                ax.set_xlabel("layer")
                ax.set_ylabel(title)
                ax.grid(axis="y", alpha=0.3)
        if components and entries:  # one legend for all panels, under them, so that it covers no bar
            handles, labels = axes[0][0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="lower center", ncol=min(len(entries), 3), fontsize=7, frameon=False)
        fig.text(0.01, 0.005, "grey outlines: sizes before pruning", fontsize=7)
        fig.subplots_adjust(left=0.12 / max(len(components), 1), right=0.98, top=0.93, bottom=0.17, wspace=0.3,
                            hspace=0.45)
        files = save(fig, stem)
    finally:
        plt.close(fig)
    return files, {"width_px": width, "height_px": height}


def _integer_axes(ax) -> None:
    """Layers and counts are whole numbers: no ticks between them."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
