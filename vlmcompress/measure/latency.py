"""Latency: warm-up, how many back-to-back calls one measurement averages, interleaved rounds (every model measured
once per round, the order rotated), and the per-batch timing row (min / median, samples/s, decode tokens/s)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import benchmark as torch_benchmark

WARMUP_CALLS = 2
MIN_MEASUREMENT_S = 0.02  # a measurement repeats the call until it lasts about this long (tiny models)


def sig(x: float, digits: int = 6) -> float:
    """`x` to `digits` significant digits (JSON that reads as what was measured, not as float noise)."""
    return float(f"{x:.{digits}g}")


def calls_per_measurement(fn: Callable[[], Any], device: torch.device) -> int:
    """Run the warm-up calls; the last one's duration sets how many calls one measurement averages."""
    for _ in range(WARMUP_CALLS):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return max(1, math.ceil(MIN_MEASUREMENT_S / max(seconds, 1e-6)))


def measure_ms(fn: Callable[[], Any], calls: int) -> float:
    """Milliseconds per call: the mean of `calls` back-to-back calls (torch's Timer, at the current threads)."""
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(calls).mean * 1e3


def interleaved_ms(cells: dict[str, tuple[Callable[[], Any], int]], repeats: int,
                   on_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """`{name: [ms per round]}`: `repeats` rounds, each measuring every `(fn, calls)` once, the starting model
    rotated every round, so that a slow spell of a shared machine falls on every model alike."""
    times: dict[str, list[float]] = {name: [] for name in cells}
    order = list(cells)
    for r in range(repeats):
        if on_round is not None:
            on_round(r)
        for name in order[r % len(order):] + order[: r % len(order)]:
            fn, calls = cells[name]
            times[name].append(measure_ms(fn, calls))
    return times


def timing_row(ms: list[float], calls: int, batch_size: int, memory: float | None,
               decode_steps: int | None = None) -> dict[str, Any]:
    """The JSON row of one (workload, batch size): min / median / all rounds, samples/s, peak memory; with
    `decode_steps` (a decode workload) also ms per token and tokens/s."""
    median = statistics.median(ms)
    row = {"ms_min": sig(min(ms)), "ms_median": sig(median), "ms_all": [sig(t) for t in ms],
           "calls_per_measurement": calls, "samples_per_s": sig(batch_size * 1e3 / median), "peak_memory_mb": memory}
    if decode_steps:
        row["ms_per_token"] = sig(median / decode_steps)
        row["tokens_per_s"] = sig(batch_size * decode_steps * 1e3 / median)
    return row
