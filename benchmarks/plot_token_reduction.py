"""Accuracy vs vision FLOPs plot and markdown table from bench_token_reduction_accuracy.py results.

    python benchmarks/plot_token_reduction.py benchmarks/results/token_reduction_accuracy_clip.json \
        --png docs/img/token_reduction_shapes_clip.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def metric_of(results: dict) -> str:
    return "vqa_accuracy" if "vqa_accuracy" in results["full"] else "i2t_R@1"


def table(results: dict) -> str:
    """Markdown: one row per (budget, algorithm) with the setting, the measured FLOPs fraction and the accuracy."""
    metric = metric_of(results)
    full = results["full"][metric]
    extra = "t2i_R@1" if metric == "i2t_R@1" else "no_image_accuracy"
    lines = [f"| vision FLOPs budget | algorithm | setting | vision FLOPs (measured) | tokens after the last layer "
             f"| {metric} | Δ points | {extra} |", "|---|---|---|---|---|---|---|---|",
             f"| 100% | none | — | 100% | {results['runs'][0]['tokens_per_layer'][0]} | {full:.4f} | — | "
             f"{results['full'][extra]:.4f} |"]
    for run in results["runs"]:
        setting = f"r={run['r']}" if "r" in run else run.get("setting", "")
        lines.append(f"| {run['budget']:.0%} | {run['algorithm']} | {setting} | {run['vision_flops_fraction']:.1%} | "
                     f"{run['tokens_per_layer'][-1]} | {run[metric]:.4f} | {100 * (run[metric] - full):+.2f} | "
                     f"{run[extra]:.4f} |")
    return "\n".join(lines)


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric_of(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    algorithms = list(dict.fromkeys(run["algorithm"] for run in results["runs"]))
    for algorithm in algorithms:
        runs = sorted((r for r in results["runs"] if r["algorithm"] == algorithm),
                      key=lambda r: r["vision_flops_fraction"])
        ax.plot([r["vision_flops_fraction"] * 100 for r in runs], [r[metric] for r in runs], marker="o",
                label=algorithm)
    ax.scatter([100], [results["full"][metric]], color="black", zorder=3, label="uncompressed")
    ax.set_xlabel("vision FLOPs (% of the uncompressed tower)")
    ax.set_ylabel(metric)
    ax.set_title(f"{results['model']}: training-free token reduction")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    print(table(results))
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    main()
