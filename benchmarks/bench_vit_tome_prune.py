"""Speed of a ViT-B/16-shaped CLIP vision tower: uncompressed vs ToMe vs structured pruning vs both.

Random init (speed does not depend on the weights), 224 px → 197 tokens, 12 layers, 768 wide. Every variant is
built by `vlmcompress.apply` on an in-memory `CLIPModel`, timed with `torch.utils.benchmark` interleaved
(variant order rotates every round), and reported as min / median ms and speed-up against the uncompressed tower
measured in the same run. FLOPs are counted with `torch.utils.flop_counter`.

    python benchmarks/bench_vit_tome_prune.py --batch-sizes 1,8 --rounds 5 --json benchmarks/results/vit.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils import benchmark

import vlmcompress
from common import vit_b16_clip, write_json
from vlmcompress.bench import count_gflops

VARIANTS = {
    "baseline": [],
    "tome_r16": [{"method": "token_reduce", "algorithm": "tome", "r": 16}],
    "prune_50": [{"method": "structured_prune", "ratio": {"vision": 0.5}}],
    "prune_50+tome_r16": [{"method": "structured_prune", "ratio": {"vision": 0.5}},
                          {"method": "token_reduce", "algorithm": "tome", "r": 16}],
}


def build(stages) -> torch.nn.Module:
    base = vit_b16_clip()
    if not stages:
        return base
    return vlmcompress.apply({"model": "in-memory", "output": "unused", "stages": stages}, model=base, save=False,
                             progress=False)


def encode(model, pixels):
    with torch.inference_mode():
        return model.get_image_features(pixel_values=pixels)


def flops(model, pixels) -> float:
    # vlmcompress.bench's counter also knows CPU scaled-dot-product attention, which FlopCounterMode alone skips
    return count_gflops(lambda: encode(model, pixels)) / pixels.shape[0]


def measure(models: dict[str, torch.nn.Module], batch_sizes: list[int], rounds: int) -> dict:
    """GFLOPs per image and interleaved timings of image encoding for every model, with speed-ups against the first
    model (the baseline), FLOPs reductions and realizations (speed-up ÷ FLOPs reduction) per batch size."""
    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "variants": {}}
    for name, model in models.items():
        results["variants"][name] = {"params": sum(p.numel() for p in model.parameters()),
                                     "gflops_per_image": round(flops(model, torch.randn(1, 3, 224, 224)), 3)}
    baseline = next(iter(models))
    for bs in batch_sizes:
        pixels = torch.randn(bs, 3, 224, 224)
        times: dict[str, list[float]] = {name: [] for name in models}
        for name, model in models.items():  # warm-up
            encode(model, pixels)
        order = list(models)
        for r in range(rounds):
            for name in order[r % len(order):] + order[: r % len(order)]:
                # Timer defaults to one thread: time with the threads the process actually uses
                timer = benchmark.Timer(stmt="encode(m, x)", num_threads=torch.get_num_threads(),
                                        globals={"encode": encode, "m": models[name], "x": pixels})
                times[name].append(timer.timeit(1).mean * 1e3)
        base = times[baseline]
        for name, ts in times.items():
            results["variants"][name][f"bs{bs}"] = {
                "ms_min": round(min(ts), 1), "ms_median": round(statistics.median(ts), 1),
                "images_per_s": round(bs * 1e3 / statistics.median(ts), 2),
                "speedup_min": round(min(base) / min(ts), 3), "speedup_median": round(statistics.median(base) /
                                                                                     statistics.median(ts), 3)}
    b = results["variants"][baseline]["gflops_per_image"]
    for v in results["variants"].values():
        v["flops_reduction"] = round(b / v["gflops_per_image"], 3)
        for bs in batch_sizes:
            v[f"bs{bs}"]["realization_median"] = round(v[f"bs{bs}"]["speedup_median"] / v["flops_reduction"], 3)
            v[f"bs{bs}"]["realization_min"] = round(v[f"bs{bs}"]["speedup_min"] / v["flops_reduction"], 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    models = {name: build(stages) for name, stages in VARIANTS.items()}
    write_json(measure(models, [int(b) for b in args.batch_sizes.split(",")], args.rounds), args.json)


if __name__ == "__main__":
    main()
