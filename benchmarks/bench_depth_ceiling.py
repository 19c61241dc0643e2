"""What a shallower `shapes-clip` reaches when trained from scratch with the teacher's own recipe (same steps,
batch, schedule, seed): the ceiling a distilled student of that depth is measured against. R@1 both ways on the
same 2,000 test pairs as bench_distill.py, next to the shipped teacher, as JSON.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_depth_ceiling.py --text-layers 1 \\
        --json benchmarks/results/depth_ceiling_text1.json

One variant trains for about as long as the teacher did (`train_seconds` in its manifest: ~33 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import shapes_recall  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-layers", type=int, default=None, help="text layers of the from-scratch variant")
    parser.add_argument("--vision-layers", type=int, default=None, help="vision layers of the from-scratch variant")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the teacher's 2,000)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from vlmcompress import zoo
    from vlmcompress.measure.machine import machine_info
    from vlmcompress.models import load_model
    from vlmcompress.stages.base import count_params

    teacher, processor = load_model("shapes-clip")
    base = zoo.ZOO["shapes-clip"]
    asked = (("text_layers", args.text_layers), ("vision_layers", args.vision_layers), ("steps", args.steps))
    changes = {k: v for k, v in asked if v}
    variant = dataclasses.replace(base, **changes)
    rows = [{"model": "shapes-clip teacher", "recipe": dataclasses.asdict(base), "params": count_params(teacher)}
            | shapes_recall(teacher, processor)]
    print(json.dumps(rows[-1]), flush=True)
    start = time.perf_counter()
    model = zoo.train_clip(variant, on_step=lambda s, loss: print(f"step {s + 1}/{variant.steps} loss {loss:.4f}",
                                                                   flush=True) if (s + 1) % 100 == 0 else None)
    minutes = round((time.perf_counter() - start) / 60, 1)
    rows.append({"model": f"from scratch {changes}", "recipe": dataclasses.asdict(variant),
                 "params": count_params(model), "minutes": minutes} | shapes_recall(model, processor))
    rows[-1]["of_teacher"] = round(rows[-1]["recall@1"] / rows[0]["recall@1"], 4)
    print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine_info(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv), "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
