"""The Pareto front of accuracy against a cost (GFLOPs: lower is better) or a speed (throughput: higher is better),
and the data of a Pareto plot. Pure functions on point dicts."""

from __future__ import annotations

import math
from typing import Any


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def pareto_front(points: list[dict[str, Any]], x_key: str, lower_is_better: bool,
                 y_key: str = "accuracy") -> list[bool]:
    """Whether each point is on the Pareto front, in the order of `points`.

    A point is on the front when no other point has ≥ `y_key` (accuracy) and a better-or-equal `x_key` (≤ when
    `lower_is_better`, else ≥) with at least one of the two strictly better. Points whose `x_key` or `y_key` is
    missing (None, NaN) are compared with nothing and are never on the front. Equal points are all on it.

    Args:
        points: dicts with `x_key` and `y_key` numbers (N of them).
    Returns:
        N bools.
    """
    usable = [_number(p.get(x_key)) and _number(p.get(y_key)) for p in points]

    def better_x(a: float, b: float) -> bool:  # a at least as good as b
        return a <= b if lower_is_better else a >= b

    front = []
    for i, p in enumerate(points):
        if not usable[i]:
            front.append(False)
            continue
        x, y = p[x_key], p[y_key]
        dominated = any(
            usable[j] and j != i and q[y_key] >= y and better_x(q[x_key], x) and (q[y_key] > y or q[x_key] != x)
            for j, q in enumerate(points))
        front.append(not dominated)
    return front


def pareto_data(points: list[dict[str, Any]], x_key: str, lower_is_better: bool, x_label: str,
                metric: str | None) -> dict[str, Any]:
    """What a Pareto plot shows, as written to `pareto_<x_key>.json`: every point with its label, accuracy, x and
    `on_front`; `left_out` lists the labels of points that lack a number (not drawn)."""
    on_front = pareto_front(points, x_key, lower_is_better)
    rows = [{"label": p["label"], "name": p["name"], "role": p["role"], "folder": p["folder"],
             "accuracy": p.get("accuracy"), x_key: p.get(x_key), "on_front": flag}
            for p, flag in zip(points, on_front)]
    return {"x_key": x_key, "x_label": x_label, "lower_is_better": lower_is_better, "metric": metric,
            "points": rows,
            "left_out": [r["label"] for r in rows if not (_number(r["accuracy"]) and _number(r[x_key]))]}


def front_line(rows: list[dict[str, Any]], x_key: str, lower_is_better: bool) -> list[tuple[float, float]]:
    """The front's points as `(x, accuracy)` sorted from the best x to the worst: the staircase a plot draws."""
    front = [(r[x_key], r["accuracy"]) for r in rows if r["on_front"]]
    return sorted(front, key=lambda xy: (xy[0] if lower_is_better else -xy[0], xy[1]))
