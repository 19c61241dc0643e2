"""Training-step speed with patch dropout (`train.patch_dropout`): samples/s at each rate on the half vision + half
text `shapes-clip` student (vision layers [0, 3], text layer [0], as `distill` builds it), interleaved rounds in
one process, as JSON with the CPU named.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_patch_dropout.py --json benchmarks/results/patch_dropout_speed.json

One measurement is `--steps` optimizer steps (forward, backward, AdamW) at `--batch-size` on fixed rows of the
shapes train split, the contrastive task loss; each round runs the rates in a rotated order. What the dropped
patches cost in accuracy is measured by `bench_distill.py --train '{"patch_dropout": 0.5, ...}'` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0,0.5,0.75", help="comma-separated patch dropout rates")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from vlmcompress.adapters import adapter_for
    from vlmcompress.data import row_stream
    from vlmcompress.data.schema import DataSource
    from vlmcompress.measure.machine import machine_info
    from vlmcompress.models import load_model
    from vlmcompress.stages.distill.student import keep_layers
    from vlmcompress.train.patch_dropout import patch_dropout

    model, processor = load_model("shapes-clip")
    adapter = adapter_for(model)
    stacks = adapter.layer_stacks(model)
    keep_layers(model, stacks["vision"], [0, 3])
    keep_layers(model, stacks["text"], [0])
    model.train()
    rows = row_stream(DataSource(builtin="shapes", split="train"), model.config.vision_config.image_size, 0)(
        0, args.batch_size)
    batch = adapter.collate(processor, rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tower = adapter.vision_tower(model)
    rates = [float(r) for r in args.rates.split(",")]

    def run(rate: float) -> float:
        start = time.perf_counter()
        with patch_dropout(model, tower, rate):
            for _ in range(args.steps):
                adapter.train_outputs(model, batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return args.steps * args.batch_size / (time.perf_counter() - start)

    for rate in rates:  # warm-up
        run(rate)
    measured: dict[float, list[float]] = {r: [] for r in rates}
    for i in range(args.rounds):
        for rate in rates[i % len(rates):] + rates[:i % len(rates)]:
            measured[rate].append(run(rate))
    median = {r: statistics.median(v) for r, v in measured.items()}
    write_json({"machine": machine_info(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"),
                "command": " ".join(sys.argv), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                "steps_per_measurement": args.steps,
                "samples_per_s": {str(r): [round(x, 1) for x in v] for r, v in measured.items()},
                "median_samples_per_s": {str(r): round(v, 1) for r, v in median.items()},
                "speedup_over_no_dropout": {str(r): round(v / median[rates[0]], 3) for r, v in median.items()}},
               args.json)


if __name__ == "__main__":
    main()
