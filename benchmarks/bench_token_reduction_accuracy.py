"""Accuracy vs vision FLOPs of the training-free token reduction algorithms on the shapes teachers, at matched FLOPs.

For every algorithm and every budget (a fraction of the uncompressed vision tower's FLOPs) the constant `r` whose
measured image-encoding FLOPs come closest to the budget is chosen, the teacher is reduced with `vlmcompress.apply`
(no training), and evaluated on the shapes test split: image↔text recall@1 over 5 folds of 1,000 pairs for
`shapes-clip`, VQA exact match for `shapes-llava` (FLOPs of the vision tower there; the LLM sees fewer image
tokens too, so its prefill FLOPs are reported as well).

    python benchmarks/bench_token_reduction_accuracy.py --model shapes-clip --budgets 0.75,0.5,0.35 \
        --json benchmarks/results/token_reduction_accuracy_clip.json
    python benchmarks/bench_token_reduction_accuracy.py --model shapes-llava --size 2000 \
        --json benchmarks/results/token_reduction_accuracy_llava.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

import vlmcompress
from vlmcompress.adapters import adapter_for
from vlmcompress.bench import count_gflops, prompt_ids
from vlmcompress.evaluate import evaluate_dual_encoder, evaluate_vqa, shapes_eval_rows
from vlmcompress.models import load_model
from common import write_json

ALGORITHMS = ("tome", "turbo", "crossget")


def vision_gflops(model) -> float:
    """GFLOPs of encoding one image (vision tower + projection; LLaVA: up to the projector output)."""
    size = model.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        return count_gflops(lambda: model.get_image_features(pixel_values=pixels))


def prefill_gflops(model) -> float:
    """GFLOPs of one LLaVA prefill: one image and the placeholder prompt built by `vlmcompress bench`."""
    size = model.config.vision_config.image_size
    ids = prompt_ids(model, "llava", 1)
    pixels = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        return count_gflops(lambda: model(input_ids=ids, pixel_values=pixels))


def reduced(name: str, stage: dict):
    fresh, _ = load_model(name)
    return vlmcompress.apply({"model": name, "output": "unused", "stages": [stage]}, model=fresh, save=False,
                             progress=False)


@functools.lru_cache(maxsize=None)
def flops_fraction(name: str, algorithm: str, r: int, full: float) -> float:
    return vision_gflops(reduced(name, {"method": "token_reduce", "algorithm": algorithm, "r": r})) / full


def choose_r(name: str, algorithm: str, target: float, full: float, max_r: int) -> tuple[int, float]:
    """The constant r whose vision FLOPs are closest to `target * full` (ties: the smaller r)."""
    best = None
    for r in range(1, max_r + 1):
        fraction = flops_fraction(name, algorithm, r, full)
        if best is None or abs(fraction - target) < abs(best[1] - target) - 1e-9:
            best = (r, fraction)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--budgets", default="0.75,0.5,0.35")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--size", type=int, default=5000, help="test examples (pairs for retrieval, questions for VQA)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model, processor = load_model(args.model)
    family = adapter_for(model).family
    rows = shapes_eval_rows(model, args.size)
    vc = model.config.vision_config
    n0 = (vc.image_size // vc.patch_size) ** 2 + 1
    max_r = n0 // 2

    def evaluate(m) -> dict:
        if family == "llava":
            r = evaluate_vqa(m, processor, rows)
            return {k: r[k] for k in ("vqa_accuracy", "no_image_accuracy")} | {"prefill_gflops": round(
                prefill_gflops(m), 4)}
        r = evaluate_dual_encoder(m, processor, rows)
        return {k: r[k] for k in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "zero_shot_shape")}

    full = vision_gflops(model)
    results = {"model": args.model, "size": args.size, "date": time.strftime("%Y-%m-%d"),
               "threads": torch.get_num_threads(), "vision_gflops_full": round(full, 4),
               "full": evaluate(model), "runs": []}
    print("full", results["full"], flush=True)
    for budget in [float(b) for b in args.budgets.split(",")]:
        for algorithm in args.algorithms.split(","):
            r, fraction = choose_r(args.model, algorithm, budget, full, max_r)
            m = reduced(args.model, {"method": "token_reduce", "algorithm": algorithm, "r": r})
            entry = {"budget": budget, "algorithm": algorithm, "r": r, "vision_flops_fraction": round(fraction, 4),
                     "tokens_per_layer": m.vlmcompress_report["tokens_per_layer"]["vision"]} | evaluate(m)
            results["runs"].append(entry)
            print(json.dumps(entry), flush=True)
    write_json(results, args.json)


if __name__ == "__main__":
    main()
