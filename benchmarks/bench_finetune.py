"""Recovery fine-tuning on the quickstart: prune + ToMe without finetune, then with `finetune` variants (full, LoRA,
with / without logit distillation) at a fixed step budget; R@1 both ways on the quickstart's 2,000 test pairs,
training seconds and samples/s, as JSON.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_finetune.py --steps 150 --json benchmarks/results/finetune.json
    python benchmarks/bench_finetune.py --variants full,lora --steps 50,100,150   # a curve: points vs steps

Each variant is one `vlmcompress.apply` of the quickstart recipe with its finetune stage appended (the teacher for
logit distillation is the source model, shapes-clip); variants run one after another in one process, so compare
accuracy across rows freely and speed as samples/s within this run only.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LORA_TARGETS = [r"re:.*vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc\d)",
                r"re:.*text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc\d)"]

VARIANTS = {
    "none": None,
    "full": {"train": {"lr": 3e-4}},
    "full_lr1e-3": {"train": {"lr": 1e-3}},
    "full_distill": {"train": {"lr": 3e-4}, "teacher": "original", "loss": {"task": 1.0, "logits": 1.0}},
    "full_distill_only": {"train": {"lr": 3e-4}, "teacher": "original", "loss": {"task": 0.0, "logits": 1.0}},
    "lora": {"train": {"lr": 1e-3}, "lora": {"r": 16, "alpha": 32, "targets": LORA_TARGETS}},
    "lora_distill": {"train": {"lr": 1e-3}, "lora": {"r": 16, "alpha": 32, "targets": LORA_TARGETS},
                     "teacher": "original", "loss": {"task": 1.0, "logits": 1.0}},
    "lora_distill_only": {"train": {"lr": 1e-3}, "lora": {"r": 16, "alpha": 32, "targets": LORA_TARGETS},
                          "teacher": "original", "loss": {"task": 0.0, "logits": 1.0}},
    "lora_lr2e-3_distill": {"train": {"lr": 2e-3}, "lora": {"r": 16, "alpha": 32, "targets": LORA_TARGETS},
                            "teacher": "original", "loss": {"task": 1.0, "logits": 1.0}},
    "lora_vision_distill": {"train": {"lr": 1e-3}, "lora": {"r": 16, "alpha": 32, "targets": LORA_TARGETS[:1]},
                            "teacher": "original", "loss": {"task": 1.0, "logits": 1.0}},
    "lora_r32_distill": {"train": {"lr": 1e-3}, "lora": {"r": 32, "alpha": 64, "targets": LORA_TARGETS},
                         "teacher": "original", "loss": {"task": 1.0, "logits": 1.0}},
    "lora_distill_t4": {"train": {"lr": 1e-3}, "lora": {"r": 16, "alpha": 32, "targets": LORA_TARGETS},
                        "teacher": "original", "loss": {"task": 1.0, "logits": 1.0, "temperature": 4.0}},
    "lora_distill_x4": {"train": {"lr": 1e-3}, "lora": {"r": 16, "alpha": 32, "targets": LORA_TARGETS},
                        "teacher": "original", "loss": {"task": 1.0, "logits": 4.0}},
    "full_vision_distill": {"train": {"lr": 3e-4}, "trainable": [r"re:vision_model\..*"], "teacher": "original",
                            "loss": {"task": 1.0, "logits": 1.0}},
    "lora_distill_x4_t4": {"train": {"lr": 1e-3}, "lora": {"r": 16, "alpha": 32, "targets": LORA_TARGETS},
                           "teacher": "original", "loss": {"task": 1.0, "logits": 4.0, "temperature": 4.0}},
    "lora_distill_x8": {"train": {"lr": 1e-3}, "lora": {"r": 16, "alpha": 32, "targets": LORA_TARGETS},
                        "teacher": "original", "loss": {"task": 1.0, "logits": 8.0}},
    # the quickstart's loss (task + 4 × logits at T = 4) with all parameters trained, for the full-vs-LoRA row
    "full_distill_x4_t4": {"train": {"lr": 3e-4}, "teacher": "original",
                           "loss": {"task": 1.0, "logits": 4.0, "temperature": 4.0}},
}


def recipe_for(base: dict, variant: dict | None, steps: int, batch_size: int, out: Path) -> dict:
    recipe = copy.deepcopy(base) | {"output": str(out)}
    recipe["data"] = dict(recipe["data"]) | {"train": {"builtin": "shapes", "split": "train"}}
    if variant is not None:
        stage = {"method": "finetune", **copy.deepcopy(variant)}
        stage["train"] = {"batch_size": batch_size, "warmup": 0.1} | stage["train"] | {"steps": steps}
        recipe["stages"] = recipe["stages"] + [stage]
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--variants", default="none,full_distill_x4_t4,quickstart")
    parser.add_argument("--steps", default="150", help="comma-separated step budgets")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--importance", default=None, help="override the prune stage's importance (magnitude, taylor)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--work", default="/tmp/vlmcompress-bench-finetune")
    args = parser.parse_args()

    import vlmcompress
    from vlmcompress.measure.machine import machine_info

    base = yaml.safe_load(Path(args.recipe).read_text())
    own = [s for s in base["stages"] if s["method"] == "finetune"]
    if own:  # `quickstart`: the recipe's own finetune stage (its steps set by --steps)
        stage = {k: v for k, v in own[0].items() if k != "method"}
        VARIANTS["quickstart"] = stage | {"train": {k: v for k, v in stage["train"].items() if k != "steps"}}
    base["stages"] = [s for s in base["stages"] if s["method"] != "finetune"]
    if args.importance:
        base["stages"] = [s | {"importance": args.importance} if s["method"] == "structured_prune" else s
                          for s in base["stages"]]
    results = {"machine": machine_info(torch.device("cpu")), "recipe": args.recipe, "batch_size": args.batch_size,
               "importance": args.importance,
               "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": []}
    for name in args.variants.split(","):
        for steps in ([0] if name == "none" else [int(s) for s in args.steps.split(",")]):
            out = Path(args.work) / f"{name}-{steps}"
            recipe = recipe_for(base, VARIANTS[name], steps, args.batch_size, out)
            t0 = time.perf_counter()
            model = vlmcompress.apply(recipe, overwrite=True, progress=False)
            wall = time.perf_counter() - t0
            report = model.vlmcompress_report
            after = report["accuracy"]["after"]
            row = {"variant": name, "steps": steps, "i2t_R@1": after["i2t_R@1"], "t2i_R@1": after["t2i_R@1"],
                   "recall@1": after["recall@1"], "teacher_recall@1": report["accuracy"]["before"]["recall@1"],
                   "apply_seconds": round(wall, 1)}
            stage = report["stages"][-1]
            if stage["method"] == "finetune":
                d = stage["details"]
                row |= {"train_seconds": d["seconds"], "samples_per_s": d["samples_per_s"],
                        "trained_parameters": d["trained_parameters"], "loss_first": d["loss_first"],
                        "loss_last": d["loss_last"]}
            row["points_below_teacher"] = round((row["teacher_recall@1"] - row["recall@1"]) * 100, 2)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
