"""Speed of ToMe, Turbo and CrossGET on a ViT-B/16-shaped CLIP vision tower at about 50% of its FLOPs.

Random init (speed does not depend on the weights), 224 px → 197 tokens, 12 layers, 768 wide. Each algorithm gets the
constant `r` whose measured FLOPs come closest to half of the uncompressed tower's; the variants are timed
interleaved against the uncompressed tower in the same run (see bench_vit_tome_prune.py), and the realization
(speed-up ÷ FLOPs reduction) is reported per batch size from medians and from minimums. The reduction's own cost is
the time spent inside the algorithm's `reduce` (matching + merging), measured with a wrapper around it over
`--rounds` forwards at the largest batch size, as a share of the whole forward.

    python benchmarks/bench_token_reduction_speed.py --batch-sizes 1,32 --rounds 5 \
        --json benchmarks/results/token_reduction_speed.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from bench_vit_tome_prune import build, encode, flops, measure
from common import write_json

from vlmcompress.modeling import reduction

ALGORITHMS = ("tome", "turbo", "crossget")


def r_for_half_flops(algorithm: str) -> tuple[int, float]:
    """The constant r whose measured FLOPs are closest to 50% of the uncompressed tower's; (r, flops fraction)."""
    pixels = torch.randn(1, 3, 224, 224)
    full = flops(build([]), pixels)
    best = None
    for r in range(14, 22):
        fraction = flops(build([{"method": "token_reduce", "algorithm": algorithm, "r": r}]), pixels) / full
        if best is None or abs(fraction - 0.5) < abs(best[1] - 0.5):
            best = (r, fraction)
    return best


def reduction_share(model: torch.nn.Module, algorithm: str, batch_size: int, rounds: int) -> float:
    """Fraction of the forward time spent in the algorithm's reduce step."""
    spent = [0.0]
    original = reduction.REDUCERS[algorithm]

    def timed(*args):
        start = time.perf_counter()
        out = original.reduce(*args)
        spent[0] += time.perf_counter() - start
        return out

    reduction.REDUCERS[algorithm] = reduction.Reducer(**{**original.__dict__, "reduce": timed})
    try:
        pixels = torch.randn(batch_size, 3, 224, 224)
        encode(model, pixels)
        spent[0] = 0.0
        start = time.perf_counter()
        for _ in range(rounds):
            encode(model, pixels)
        total = time.perf_counter() - start
    finally:
        reduction.REDUCERS[algorithm] = original
    return spent[0] / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    settings = {a: r_for_half_flops(a) for a in ALGORITHMS}
    models = {"baseline": build([])}
    for algorithm, (r, _) in settings.items():
        models[f"{algorithm}_r{r}"] = build([{"method": "token_reduce", "algorithm": algorithm, "r": r}])
    results = measure(models, batch_sizes, args.rounds)
    results["load_average_1m"] = round(os.getloadavg()[0], 2)
    for algorithm, (r, fraction) in settings.items():
        entry = results["variants"][f"{algorithm}_r{r}"]
        entry["r"], entry["flops_fraction"] = r, round(fraction, 4)
        entry["reduce_share_of_forward"] = round(
            reduction_share(models[f"{algorithm}_r{r}"], algorithm, max(batch_sizes), args.rounds), 4)
    write_json(results, args.json)


if __name__ == "__main__":
    main()
