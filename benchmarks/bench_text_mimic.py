"""How closely a one-layer text tower can imitate the two-layer `shapes-clip` teacher's text embeddings: the
student's text tower (teacher text layer 0, final norm and projection) trained on captions alone to the teacher's
unit text embeddings (distill's `embedding` term, text side), then R@1 with the teacher's own vision tower.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_text_mimic.py --steps 1500 \\
        --json benchmarks/results/text_mimic_1500.json

If the one-layer tower could reproduce the teacher's text function, R@1 would reach the teacher's; the distance it
plateaus at says how much of the teacher's embedding space the student has to give up (and relearn jointly).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import shapes_recall, write_json  # noqa: E402


def mimic_text(student, teacher, processor, steps: int, batch_size: int, lr: float, log: bool = True) -> list[dict]:
    """Train `student`'s text tower and text projection on captions alone (fresh `shapes` captions, batch
    `batch_size`) to the teacher's unit text embeddings, with the teacher's schedule; returns the distance trace."""
    from vlmcompress import zoo
    from vlmcompress.adapters.base import pooled
    from vlmcompress.data import shapes
    from vlmcompress.train.losses import embedding_distance

    trained = [p.requires_grad_(True) for n, p in student.named_parameters()
               if n.startswith(("text_model.", "text_projection."))]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    rng, config = np.random.default_rng(123), shapes.ShapesConfig()
    trace = []
    for step in range(steps):
        for group in opt.param_groups:  # the teacher's schedule
            group["lr"] = lr * zoo.lr_factor(step, steps, 0.05)
        texts = [shapes.caption(shapes.sample_scene(rng, config)) for _ in range(batch_size)]
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            want = pooled(teacher.get_text_features(**tokens))
        loss = embedding_distance({"text": pooled(student.get_text_features(**tokens))}, {"text": want})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            trace.append({"step": step + 1, "distance": round(loss.item(), 4)})
            if log:
                print(json.dumps(trace[-1]), flush=True)
    return trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from vlmcompress.adapters import BUILTIN_TINY
    from vlmcompress.measure.machine import machine_info
    from vlmcompress.models import load_model
    from vlmcompress.stages.distill.student import keep_layers

    torch.manual_seed(0)
    teacher, processor = load_model("shapes-clip")
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher)
    keep_layers(student, BUILTIN_TINY["tiny-clip"].layer_stacks(student)["text"], [0])
    start = time.perf_counter()
    trace = mimic_text(student, teacher, processor, args.steps, args.batch_size, args.lr)
    student.eval()
    rows = [{"model": "teacher"} | shapes_recall(teacher, processor),
            {"model": "teacher vision + 1-layer text mimicking the teacher's text embeddings",
             "minutes": round((time.perf_counter() - start) / 60, 1)} | shapes_recall(student, processor)]
    rows[1]["of_teacher"] = round(rows[1]["recall@1"] / rows[0]["recall@1"], 4)
    write_json({"machine": machine_info(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"),
                "command": " ".join(sys.argv), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                "threads": torch.get_num_threads(), "distance_trace": trace, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
