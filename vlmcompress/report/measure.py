"""The numbers a report measures itself, where report.json holds none (or `measure=True` asks for them):

- GFLOPs per sample: the family's first workload (`vlmcompress.measure.workloads.WORKLOADS`: image encoding for
  dual encoders and BLIP, the prefill of one image and a 32-token prompt for generators) counted at batch 1 by
  `vlmcompress.measure.flops.count_gflops`: what `apply`'s `quick_speed` records as `gflops_per_sample`;
- throughput: that workload at batch 8 for every model of the report, interleaved (`measure.latency.interleaved_ms`,
  the helper `vlmcompress bench` times with: every round measures every model once, the order rotated), so that a
  slow spell of a shared machine falls on all of them alike; samples/s = batch size / median ms;
- the accuracy of a base model no output recorded, on the same eval data as the outputs (`accuracy.measure`).
"""

from __future__ import annotations

import statistics
from typing import Any

THROUGHPUT_BATCH = 8  # as `apply`'s quick_speed, so measured and recorded throughputs are the same quantity
THROUGHPUT_ROUNDS = 5


def load(source: str) -> tuple[Any, Any, Any]:
    """`(model, processor or None, adapter)` of a folder, built-in name or Hub id, in eval mode without grads."""
    from ..adapters import adapter_for
    from ..models import load_model

    model, processor = load_model(str(source))
    model.eval().requires_grad_(False)
    return model, processor, adapter_for(model)


def first_workload(family: str):
    from ..measure.workloads import WORKLOADS

    return WORKLOADS[family][0]


def gflops_per_sample(model, adapter) -> float:
    """GFLOPs of one sample of the family's first workload (batch 1)."""
    from ..measure.flops import count_gflops
    from ..measure.latency import sig

    fn = first_workload(adapter.family).build(model, adapter, 1, model.device)
    return sig(count_gflops(fn, model))


def interleaved_throughput(models: dict[str, tuple[Any, Any]], batch_size: int = THROUGHPUT_BATCH,
                           rounds: int = THROUGHPUT_ROUNDS) -> dict[str, dict[str, Any]]:
    """`{name: {"throughput" (samples/s), "ms_median", "ms_all", "batch_size", "rounds", "workload", "threads"}}`
    for `{name: (model, adapter)}`, all models measured in the same rounds."""
    import torch

    from ..measure.latency import calls_per_measurement, interleaved_ms, sig

    cells = {}
    for name, (model, adapter) in models.items():  # inputs built and every model warmed up before any is timed
        fn = first_workload(adapter.family).build(model, adapter, batch_size, model.device)
        cells[name] = (fn, calls_per_measurement(fn, model.device))
    times = interleaved_ms(cells, rounds)
    out = {}
    for name, ms in times.items():
        median = statistics.median(ms)
        out[name] = {"throughput": round(batch_size * 1e3 / median, 4), "ms_median": sig(median),
                     "ms_all": [sig(t) for t in ms], "batch_size": batch_size, "rounds": rounds,
                     "workload": first_workload(models[name][1].family).key, "threads": torch.get_num_threads()}
    return out


def accuracy_on(model, processor, family: str, data: dict[str, Any], seed: int) -> dict[str, float] | None:
    """The accuracy `apply` would measure on `data` (a report's `accuracy.data`), or None where it cannot."""
    from ..accuracy import measure
    from ..data import load_rows
    from ..data.schema import DataSource

    source = DataSource(**{k: v for k, v in data.items() if v is not None})
    rows = load_rows(source, model, seed, source.size or 2000)
    return measure(model, processor, family, rows)
