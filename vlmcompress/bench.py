"""Speed and size of a model, alone or against another model of the same family measured in the same run.

    from vlmcompress.bench import benchmark
    result = benchmark("out/base", against="out/tome", batch_sizes=(1, 8), repeats=3)
    result["ratios"]["workloads"]["image"]["batch_sizes"]["8"]["speedup_median"]

What is timed is fixed per family (`WORKLOADS`) and printed in `result["what"]`:

- dual encoders (CLIP, SigLIP): `image` = `get_image_features(pixel_values)` (vision tower + projection) and
  `text` = `get_text_features(input_ids, attention_mask)` on 32 tokens (SigLIP: no mask), each at every batch size;
- BLIP retrieval: `image` = `vision_model(pixel_values)` and `itm` = the image-text matching forward
  (`model(input_ids, attention_mask, pixel_values, use_itm_head=True)`: vision tower + text encoder), 32 tokens;
- generators (BLIP-2, LLaVA): `prefill` = one forward over one image plus a 32-token prompt, as a processor writes
  it (LLaVA: `(image_size / patch_size)²` placeholders `config.image_token_id`; BLIP-2: `num_query_tokens`
  placeholders `config.image_token_index`), returning the KV cache and the last position's logits, at every batch
  size; `decode` = 16 greedy steps with the KV cache of that prefill, timed directly (one forward per token on the
  cache, argmax fed back; the cache is cropped back to the prompt before every run), batch 1 only.

An ONNX export (the `onnx/` folder of the quantize stage's `onnxruntime` backend) is measured by the same code:
its graphs run in ONNX Runtime behind `get_image_features` / `get_text_features`, and every model of the run times
the workloads the export holds (`EXPORT_WORKLOADS`: dual encoders as above; LLaVA: `image` =
`get_image_features(pixel_values)`, vision tower + projector), so `bench out --against out/onnx` compares PyTorch
and ONNX Runtime on the same calls.

Measurements per model and workload: GFLOPs per sample (`torch.utils.flop_counter.FlopCounterMode` at batch 1,
with the CPU flash-attention kernel counted, which the stock counter leaves out); ms per batch (min and median) and
samples/s with `torch.utils.benchmark.Timer` after two warm-up calls; models interleaved with the order rotated every
round; peak memory of one extra untimed call (CPU: peak growth of the process RSS above the RSS just before the call,
sampled from /proc/self/statm every 1 ms by a background thread after `gc.collect()` and glibc `malloc_trim(0)`;
CUDA: `torch.cuda.max_memory_allocated` above the memory allocated before the call). Per model: parameters, size on
disk, and tokens at every layer of the vision tower.

JSON layout (`benchmark()`'s return value, `vlmcompress bench --json`); keys are stable:

    {"machine": {"device", "device_name", "threads", "cpu_count", "load_average_1m" (other processes compete for
                 the CPU when it nears cpu_count), "platform", "python", "torch", "transformers", "vlmcompress",
                 "date"},
     "what": {"workloads": {workload: description}, "timing", "flops", "memory", "tokens_per_layer", "params",
              "size_on_disk", "ratios", with an ONNX export: "onnxruntime"},
     "models": {name: {"source", "role" ("model" | "against"), "family", "class", "dtype",
                       "parameters", "size_on_disk_bytes" (null unless a local folder with *.safetensors;
                       ONNX exports: the *.onnx files), ONNX exports only: "runtime" (ONNX Runtime settings),
                       "tokens_per_layer": [tokens entering layer 0, tokens after layer 0, ..., after the last layer],
                       "workloads": {workload: {"gflops_per_sample",
                                                "batch_sizes": {"1": {"ms_min", "ms_median", "ms_all",
                                                                      "calls_per_measurement", "samples_per_s",
                                                                      "peak_memory_mb", decode only:
                                                                      "ms_per_token", "tokens_per_s"}}}}}},
     "ratios": null | {"model", "against", "params_reduction", "size_reduction" (null when a size is null),
                       "workloads": {workload: {"flops_reduction",
                                                "batch_sizes": {"1": {"speedup_median", "speedup_min",
                                                                      "realization"}}}}}}

Every ratio is MODEL ÷ AGAINST, so > 1 means AGAINST is faster or smaller: `speedup_median` = MODEL's median ms ÷
AGAINST's median ms (`speedup_min` likewise with the minimum), `flops_reduction`, `params_reduction` and
`size_reduction` likewise with GFLOPs per sample, parameters and bytes on disk, and `realization` =
`speedup_median` ÷ `flops_reduction` (1.0: the FLOPs saved all turned into wall-clock time). Model names are the
strings given (a second, equal name gets " #2" appended). Batch sizes are JSON object keys, hence strings.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for
from .errors import ModelLoadError, UnsupportedModelError, VlmCompressError
from .measure.flops import count_gflops, tokens_per_layer
from .measure.latency import (
    MIN_MEASUREMENT_S,
    WARMUP_CALLS,
    calls_per_measurement,
    interleaved_ms,
    measure_ms,
    sig,
    timing_row,
)
from .measure.machine import machine_info
from .measure.memory import memory_method, peak_memory_mb
from .measure.workloads import DECODE_STEPS, EXPORT_WORKLOADS, TEXT_TOKENS, WORKLOADS, Workload, is_export, prompt_ids
from .models import builtin_names, load_model
from .progress import Progress
from .stages.base import count_params

__all__ = ["DECODE_STEPS", "EXPORT_WORKLOADS", "TEXT_TOKENS", "WORKLOADS", "Workload", "benchmark", "count_gflops",
           "is_export", "machine_info", "memory_method", "parse_batch_sizes", "peak_memory_mb", "prompt_ids",
           "quick_speed", "tokens_per_layer"]



# ----------------------------------------------------------------------------------------------------------------
# inputs and models (workloads, FLOPs, memory and machine facts: `vlmcompress.measure`)


def parse_batch_sizes(value: str | int | Iterable[int]) -> list[int]:
    """`"1,32"`, `8` or `(1, 32)` → `[1, 32]`; raises `VlmCompressError` on anything but positive integers."""
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else list(value)
    sizes: list[int] = []
    for item in items:
        text = item.strip() if isinstance(item, str) else item
        if isinstance(text, bool) or not (isinstance(text, int) or (isinstance(text, str) and text.isdigit())):
            raise VlmCompressError(f"batch sizes must be positive integers separated by commas, like '1,32'; "
                                   f"got {value!r}")
        size = int(text)
        if size < 1:
            raise VlmCompressError(f"batch sizes must be at least 1; got {size} in {value!r}")
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise VlmCompressError("no batch sizes given; pass e.g. --batch-sizes 1,32")
    return sizes


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1:
        return True
    parent = Path(name).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()  # "out/missing" where out/ exists


def load_for_bench(name: str) -> tuple[nn.Module, Path | None]:
    """`(model, local folder or None)`; a missing folder is an error here rather than a failed Hub lookup."""
    path = Path(name).expanduser()
    if path.is_dir():
        model, _ = load_model(str(path))
        return model, path
    if path.exists():
        raise ModelLoadError(f"'{name}' is a file, not a model folder; give a folder written by save_pretrained or "
                             "`vlmcompress apply`, a built-in name or a Hub id")
    if _looks_like_path(name):
        raise ModelLoadError(f"folder '{name}' does not exist; give a folder written by save_pretrained or "
                             f"`vlmcompress apply`, a built-in name ({', '.join(builtin_names())}) or a Hub id")
    model, _ = load_model(name)
    return model, None


def size_on_disk(folder: Path | None) -> int | None:
    """Bytes of the `*.safetensors` files in `folder` (None for built-ins, Hub ids and folders without any)."""
    if folder is None:
        return None
    files = list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


# ----------------------------------------------------------------------------------------------------------------
# the benchmark


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def benchmark(
    model_or_dir: str,
    against: str | None = None,
    batch_sizes: str | int | Iterable[int] = (1, 32),
    repeats: int = 5,
    threads: int | None = None,
    progress: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Measure `model_or_dir` (and `against`, interleaved in the same run) and return the result dict.

    Args:
        model_or_dir: a local folder (also a `vlmcompress apply` output), a built-in name or a Hub id.
        against: a second model of the same family; ratios are `model_or_dir ÷ against`.
        batch_sizes: batch sizes of every workload but `decode` (batch 1): `(1, 32)` or `"1,32"`.
        repeats: rounds of timing; every round measures every model once, the order rotating.
        threads: torch CPU threads for the run (default: as set, `torch.get_num_threads()`).
        progress: show a rich progress bar on stderr.
        device: `"cpu"`, `"cuda"`, ... (default: CUDA when available).
    Returns:
        The dict documented in the module docstring.
    Raises:
        ModelLoadError: unknown name, missing folder or unreadable model.
        UnsupportedModelError: `against` of another family, or an unsupported model.
        VlmCompressError: bad batch sizes, repeats or threads.
    """
    sizes = parse_batch_sizes(batch_sizes)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise VlmCompressError(f"repeats must be a positive integer; got {repeats!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise VlmCompressError(f"threads must be a positive integer; got {threads!r}")
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise VlmCompressError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VlmCompressError("device cuda was asked for but torch sees no CUDA device; use --device cpu")
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(model_or_dir, against, sizes, repeats, progress, dev)
    finally:
        torch.set_num_threads(threads_before)


def _run(model_or_dir, against, sizes, repeats, progress, device) -> dict[str, Any]:
    machine = machine_info(device)  # before loading: the load average is the one the run starts with
    sources = [("model", model_or_dir)] + ([("against", against)] if against is not None else [])
    loaded: dict[str, dict[str, Any]] = {}
    with Progress("bench", total=len(sources), enabled=progress, transient=True) as bar:
        for role, source in sources:
            bar.update(description=f"loading {source}")
            model, folder = load_for_bench(source)
            name = source if source not in loaded else f"{source} #2"
            loaded[name] = {"role": role, "source": source, "folder": folder,
                            "model": model.to(device).eval().requires_grad_(False),
                            "adapter": adapter_for(model)}
            bar.update(advance=1, description=f"loaded {source}")
        entries = list(loaded.values())
        families = [e["adapter"].family for e in entries]
        if len(set(families)) > 1:
            raise UnsupportedModelError(
                f"--against '{against}' is a {families[1]} model but '{model_or_dir}' is a {families[0]} model; "
                "compare two models of the same family")
        workloads = WORKLOADS[families[0]]
        if any(is_export(e["model"]) for e in entries):
            if device.type != "cpu":
                raise VlmCompressError("ONNX exports run on CPU with ONNX Runtime here; use --device cpu")
            workloads = EXPORT_WORKLOADS[families[0]]
        cells = [(w, bs) for w in workloads for bs in (sizes if w.batched else [1])]
        bar.update(total=len(sources) + len(workloads) * len(entries) + len(cells) * (repeats + 2 * len(entries)))

        results = {name: _static(e, workloads, device, bar) for name, e in loaded.items()}
        for w, bs in cells:
            cells_ms = {}
            for name, e in loaded.items():  # build inputs and warm up every model before any is timed
                bar.update(advance=1, description=f"{w.key} bs{bs}: warm-up {name}")
                fn = w.build(e["model"], e["adapter"], bs, device)
                cells_ms[name] = (fn, calls_per_measurement(fn, device))
            times = interleaved_ms(cells_ms, repeats, on_round=lambda r: bar.update(
                advance=1, description=f"{w.key} bs{bs}: round {r + 1}/{repeats}"))
            for name, (fn, calls) in cells_ms.items():
                bar.update(advance=1, description=f"{w.key} bs{bs}: memory {name}")
                results[name]["workloads"][w.key]["batch_sizes"][str(bs)] = timing_row(
                    times[name], calls, bs, peak_memory_mb(fn, device),
                    decode_steps=DECODE_STEPS if w.key == "decode" else None)
    names = list(loaded)
    what = _what(workloads, repeats, device)
    if any(is_export(e["model"]) for e in entries):
        what["onnxruntime"] = ("ONNX exports: ONNX Runtime sessions on the CPU execution provider (threads in each "
                               "model's `runtime`), timed by the same Timer loop; GFLOPs and tokens per layer are "
                               "those of the PyTorch model at export (onnx/config.json), parameters are the elements "
                               "of the graphs' initializers, size on disk is the *.onnx files")
    return {"machine": machine, "what": what,
            "models": results,
            "ratios": _ratios(names[0], names[1], results) if len(names) == 2 else None}


def _static(entry: dict, workloads: list[Workload], device: torch.device, bar: Progress) -> dict[str, Any]:
    """Everything measured once per model: parameters, size, tokens per layer, GFLOPs per sample."""
    model, adapter = entry["model"], entry["adapter"]
    if is_export(model):
        info = model.bench_static()
        gflops = info.pop("gflops")
        return {"source": entry["source"], "role": entry["role"], "family": adapter.family, **info,
                "workloads": {w.key: {"gflops_per_sample": gflops[w.key], "batch_sizes": {}} for w in workloads}}
    out = {"source": entry["source"], "role": entry["role"], "family": adapter.family, "class": type(model).__name__,
           "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
           "parameters": count_params(model),
           "size_on_disk_bytes": size_on_disk(entry["folder"]),
           "tokens_per_layer": None, "workloads": {}}
    for w in workloads:
        bar.update(advance=1, description=f"{w.key}: counting FLOPs of {entry['source']}")
        fn = w.build(model, adapter, 1, device)
        if w.vision and out["tokens_per_layer"] is None:
            out["tokens_per_layer"] = tokens_per_layer(model, adapter, fn)
        out["workloads"][w.key] = {"gflops_per_sample": sig(count_gflops(fn, model)), "batch_sizes": {}}
    return out


def _ratios(base: str, other: str, results: dict[str, Any]) -> dict[str, Any]:
    a, b = results[base], results[other]
    size = _ratio(a["size_on_disk_bytes"], b["size_on_disk_bytes"])
    out = {"model": base, "against": other, "params_reduction": round(a["parameters"] / b["parameters"], 4),
           "size_reduction": None if size is None else round(size, 4), "workloads": {}}
    for key, wa in a["workloads"].items():
        wb = b["workloads"][key]
        flops = _ratio(wa["gflops_per_sample"], wb["gflops_per_sample"])
        rows = {}
        for bs, ta in wa["batch_sizes"].items():
            tb = wb["batch_sizes"][bs]
            speedup = ta["ms_median"] / tb["ms_median"]
            rows[bs] = {"speedup_median": round(speedup, 4), "speedup_min": round(ta["ms_min"] / tb["ms_min"], 4),
                        "realization": None if not flops else round(speedup / flops, 4)}
        out["workloads"][key] = {"flops_reduction": None if flops is None else round(flops, 4), "batch_sizes": rows}
    return out


def _what(workloads: list[Workload], repeats: int, device: torch.device) -> dict[str, Any]:
    return {
        "workloads": {w.key: w.description for w in workloads},
        "timing": (f"torch.utils.benchmark.Timer with {torch.get_num_threads()} threads, eager, inference_mode; "
                   f"{WARMUP_CALLS} warm-up calls per model, then {repeats} rounds, each measuring every model once "
                   "(order rotated every round); a measurement is the mean of back-to-back calls (as many as make "
                   f"about {MIN_MEASUREMENT_S * 1e3:.0f} ms); ms per batch, min and median over rounds; "
                   "samples/s = batch size / median"),
        "flops": ("torch.utils.flop_counter.FlopCounterMode over one call at batch 1 (2 × multiply-adds of matmuls, "
                  "convolutions and attention, CPU flash attention included); GFLOPs per sample"),
        "memory": memory_method(device),
        "tokens_per_layer": ("vision tower, one sample: tokens entering layer 0, then after each layer "
                             "(forward hooks on the encoder layers, hidden_states.shape[1])"),
        "params": "sum of numel over model.parameters() (tied weights once)",
        "size_on_disk": "sum of the *.safetensors files in the model folder; null for built-ins and Hub ids",
        "ratios": ("MODEL ÷ AGAINST (> 1: AGAINST is faster or smaller); realization = speedup_median ÷ "
                   "flops_reduction"),
    }


BUSY_SPREAD = 1.5  # slowest / fastest round of one model above this: the machine is too busy to compare


def compare_speed(before: nn.Module, after: nn.Module, adapter: ModelAdapter, batch_size: int = 8,
                  rounds: int = 5) -> dict[str, Any]:
    """The family's first workload on the uncompressed and the compressed model, interleaved in `rounds` rounds (the
    starting model rotated), so that a slow spell of a shared machine falls on both: the ratio of the medians, the
    range of the per-round ratios, and `busy` when either model's slowest round is more than `BUSY_SPREAD` × its
    fastest (then no ratio is worth printing)."""
    workload = WORKLOADS[adapter.family][0]
    device = after.device
    cells = {}
    for name, model in (("before", before), ("after", after)):
        fn = workload.build(model, adapter, batch_size, device)
        cells[name] = (fn, calls_per_measurement(fn, device))
    # every figure below is derived from the recorded (rounded) times, so that report.json is self-consistent: a
    # reader recomputing the range or the spread from ms_before / ms_after gets the recorded values
    times = {name: [round(t, 3) for t in ms] for name, ms in interleaved_ms(cells, rounds).items()}
    spread = max(max(t) / min(t) for t in times.values())
    per_round = [b / a for b, a in zip(times["before"], times["after"])]
    return {"workload": workload.key, "batch_size": batch_size, "rounds": rounds, "threads": torch.get_num_threads(),
            "ms_before": times["before"], "ms_after": times["after"],
            "ms_median_before": round(statistics.median(times["before"]), 3),
            "ms_median_after": round(statistics.median(times["after"]), 3),
            "speedup": round(statistics.median(times["before"]) / statistics.median(times["after"]), 3),
            "speedup_range": [round(min(per_round), 3), round(max(per_round), 3)],
            "spread": round(spread, 2), "busy": spread > BUSY_SPREAD}


def quick_speed(model: nn.Module, adapter: ModelAdapter, batch_size: int = 8, repeats: int = 3) -> dict[str, Any]:
    """Median latency and GFLOPs of the family's first workload (image encoding / prefill) on an in-memory model.

    Used by `apply` before and after every stage; the model changes in place between calls, so unlike `benchmark`
    these measurements cannot be interleaved: compare them as a guide, and use `vlmcompress bench --against` for
    numbers to publish.
    """
    device = model.device
    workload = WORKLOADS[adapter.family][0]
    fn = workload.build(model, adapter, batch_size, device)
    gflops = (model.bench_static()["gflops"][workload.key] if is_export(model)
              else count_gflops(fn, model) / batch_size)
    calls = calls_per_measurement(fn, device)
    ms = [measure_ms(fn, calls) for _ in range(repeats)]
    return {"workload": workload.key, "batch_size": batch_size, "ms_median": round(statistics.median(ms), 3),
            "ms_min": round(min(ms), 3), "gflops_per_sample": round(gflops, 6), "threads": torch.get_num_threads()}
