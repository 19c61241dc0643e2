"""Distilled students (stage `distill`, EfficientVLM's first stage) against their teacher, before and after a
`finetune`, as JSON: parameters, vision GFLOPs, R@1 both ways (shapes-clip) or VQA accuracy (shapes-llava).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_distill.py --model shapes-clip --steps 400 \\
        --json benchmarks/results/distill_shapes_clip.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_distill.py --model shapes-llava --steps 150 \\
        --json benchmarks/results/distill_shapes_llava.json
    python benchmarks/bench_distill.py --throughput   # samples/s of 1 and 2 processes (torchrun), same global batch

A row runs `[distill, finetune]` in one `vlmcompress.apply`; "before finetune" is the accuracy `apply` measured
after the distill stage (shapes-clip), or a second apply without the finetune (shapes-llava, whose VQA accuracy is
measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import shapes_recall  # noqa: E402

STUDENTS = {"shapes-clip": {"half vision": {"vision": 2}, "half vision + half text": {"vision": 2, "text": 1}},
            "shapes-llava": {"llm [0, 2]": {"llm": [0, 2]}, "llm [0]": {"llm": [0]}}}


DISTILL_LOSS = {"task": 1.0, "logits": 1.0, "hidden": 1.0, "temperature": 2.0}


def recipe(model: str, student: dict | None, steps: int, finetune_steps: int, out: Path, lr: float = 3e-4,
           loss: dict | None = None, train: dict | None = None, extra: dict | None = None) -> dict:
    eval_size = 2000 if model == "shapes-clip" else 300
    stages = []
    if student is not None:
        stages.append({"method": "distill", "student": student,
                       "loss": DISTILL_LOSS | (loss or {}),
                       "train": {"steps": steps, "batch_size": 64 if model == "shapes-clip" else 16,
                                 "lr": lr, "warmup": 0.05} | (train or {})} | (extra or {}))
    if finetune_steps:
        stages.append({"method": "finetune", "teacher": "original",
                       "loss": {"task": 1.0, "logits": 4.0, "temperature": 4.0},
                       "train": {"steps": finetune_steps, "batch_size": 64 if model == "shapes-clip" else 16,
                                 "lr": 1e-4, "warmup": 0.1}})
    return {"model": model, "output": str(out),
            "data": {"train": {"builtin": "shapes", "split": "train"},
                     "eval": {"builtin": "shapes", "split": "test", "size": eval_size}},
            "stages": stages}


def vqa(model, model_name: str) -> float:
    from vlmcompress.evaluate import evaluate_vqa
    from vlmcompress.models import load_model

    processor = load_model(model_name)[1]
    return evaluate_vqa(model, processor, size=300)["vqa_accuracy"]


def students(args) -> dict:
    import vlmcompress
    from vlmcompress.stages.base import count_params

    rows = []
    work = Path(tempfile.mkdtemp(prefix="vlmc-distill-"))
    from vlmcompress.models import load_model

    teacher, processor = load_model(args.model)
    row = {"student": "teacher", "params": count_params(teacher)}
    if args.model == "shapes-clip":
        row |= shapes_recall(teacher, processor)
    else:
        row["vqa"] = vqa(teacher, args.model)
    rows.append(row)
    print(json.dumps(row), flush=True)
    candidates = STUDENTS[args.model] | ({"custom": json.loads(args.student)} if args.student else {})
    for name, student in candidates.items():
        if (args.students or args.student) and name not in (args.students or "custom").split(","):
            continue
        t0 = time.perf_counter()
        out = work / name.replace(" ", "_")
        loss = json.loads(args.loss) if args.loss else None
        train = json.loads(args.train) if args.train else None
        extra = json.loads(args.distill) if args.distill else None
        model = vlmcompress.apply(recipe(args.model, student, args.steps, args.finetune_steps, out, args.lr, loss,
                                         train, extra),
                                  overwrite=True, progress=False)
        report = model.vlmcompress_report
        distill, finetune = report["stages"][0], report["stages"][-1]
        row = {"student": name, "spec": student, "params": report["params_after"], "distill_loss": DISTILL_LOSS | (loss or {}),
               "distill_train": train, "distill_extra": extra,
               "distill_steps": args.steps, "finetune_steps": args.finetune_steps, "distill_lr": args.lr,
               "distill_seconds": distill["details"]["seconds"],
               "finetune_seconds": finetune["details"]["seconds"] if args.finetune_steps else 0.0,
               "distill_samples_per_s": distill["details"]["samples_per_s"],
               "vision_gflops": distill["details"].get("speed", {}).get("after", {}).get("gflops_per_sample")}
        if args.model == "shapes-clip":
            for when, stage in (("before_finetune", distill), ("after_finetune", finetune)):
                acc = stage["details"]["accuracy"]["after"]
                row[when] = {"i2t_R@1": acc["i2t_R@1"], "t2i_R@1": acc["t2i_R@1"], "recall@1": acc["recall@1"]}
                row[when]["of_teacher"] = round(acc["recall@1"] / rows[0]["recall@1"], 4)
        else:
            row["after_finetune"] = {"vqa": vqa(model, args.model)}
            only = vlmcompress.apply(recipe(args.model, student, args.steps, 0, work / "only"), overwrite=True,
                                     progress=False)
            row["before_finetune"] = {"vqa": vqa(only, args.model)}
        row["minutes"] = round((time.perf_counter() - t0) / 60, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows}


THROUGHPUT_RECIPE = """\
model: shapes-clip
output: {out}
data:
  train: {{builtin: shapes, split: train}}
stages:
  - method: distill
    student: {{vision: 2}}
    train: {{steps: 20, batch_size: {batch}, lr: 3.0e-4}}
"""


def throughput() -> dict:
    work = Path(tempfile.mkdtemp(prefix="vlmc-throughput-"))
    out = {}
    for procs in (1, 2):
        folder = work / f"p{procs}"
        path = work / f"p{procs}.yaml"
        path.write_text(THROUGHPUT_RECIPE.format(out=folder, batch=64 // procs))
        env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // procs))}
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                     "29601"] if procs > 1 else [sys.executable])
        subprocess.run([*launcher, "-m", "vlmcompress", "apply", str(path)], check=True, env=env,
                       capture_output=True)
        details = json.loads((folder / "report.json").read_text())["stages"][0]["details"]
        out[f"{procs} process(es)"] = {"samples_per_s": details["samples_per_s"], "world_size": details["world_size"],
                                       "threads_per_process": env["OMP_NUM_THREADS"], "global_batch": 64}
        print(json.dumps(out), flush=True)
    return {"throughput": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-clip", choices=list(STUDENTS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-4, help="distill learning rate")
    parser.add_argument("--students", default=None, help="comma-separated student names (default: all)")
    parser.add_argument("--student", default=None, help='one student as JSON, e.g. \'{"vision": 2, "text": [1]}\'')
    parser.add_argument("--loss", default=None, help='distill loss weights over the default, as JSON: \'{"hidden": 0}\'')
    parser.add_argument("--train", default=None, help='distill train settings over the default, as JSON: '
                                                          '\'{"batch_size": 128}\'')
    parser.add_argument("--distill", default=None, help='more keys of the distill stage, as JSON: '
                                                            '\'{"lr_scale": {"text": 3}}\'')
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from vlmcompress.measure.machine import machine_info

    result = {"machine": machine_info(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv)}
    result |= throughput() if args.throughput else students(args) | {"model": args.model}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
