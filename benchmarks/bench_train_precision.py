"""Training-step speed by precision: fp32 vs bf16 autocast (as `train.mixed_precision: bf16`) on the quickstart's
compressed model, interleaved rounds in one process, as JSON with the CPU named.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_train_precision.py --json benchmarks/results/train_precision.json

One measurement is `--steps` optimizer steps (forward, backward, AdamW) at `--batch-size` on fixed rows of the
shapes train split; rounds alternate the order of the two precisions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import vlmcompress
    from vlmcompress.data import row_stream
    from vlmcompress.data.schema import DataSource
    from vlmcompress.measure.machine import machine_info
    from vlmcompress.models import load_model

    recipe = {"model": args.model, "output": "/tmp/unused", "stages": [
        {"method": "structured_prune", "ratio": {"vision": 0.25}, "targets": ["mlp"]},
        {"method": "token_reduce", "r": 16}]}
    model = vlmcompress.apply(recipe, save=False, progress=False).train()
    _, processor = load_model(args.model)
    adapter = vlmcompress.adapters.adapter_for(model)
    rows = row_stream(DataSource(builtin="shapes", split="train"),
                      model.config.vision_config.image_size, 0)(0, args.batch_size)
    batch = adapter.collate(processor, rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def run(precision: str) -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = adapter.train_outputs(model, batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return args.steps * args.batch_size / (time.perf_counter() - start)

    run("fp32"), run("bf16")  # warm-up
    rates = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for precision in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            rates[precision].append(run(precision))
    median = {k: statistics.median(v) for k, v in rates.items()}
    result = {"machine": machine_info(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv), "batch_size": args.batch_size, "steps_per_measurement": args.steps,
              "samples_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
              "median_samples_per_s": {k: round(v, 1) for k, v in median.items()},
              "bf16_speedup": round(median["bf16"] / median["fp32"], 3)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
