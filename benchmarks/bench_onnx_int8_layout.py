"""Which int8 layout ONNX Runtime computes exactly on which x86 CPU: agreement with torch and recall@1 of every
layout, on this CPU and on CPUs emulated by qemu-user (the graphs run under `qemu-x86_64 -cpu NAME`, which reports
the emulated CPU's features to ONNX Runtime's kernel dispatch; accuracy only, emulated speed means nothing).

Layouts (ONNX Runtime dynamic int8, uint8 activations per tensor, weights per output channel):
  u8s8      int8 weights, 8 bits: what ONNX Runtime's quantizer does by default
  u8s8_rr   int8 weights on 7 bits (reduce_range): what vlmcompress picks on x86 without VNNI / AMX
  u8u8      uint8 weights (asymmetric), 8 bits

Usage: python benchmarks/bench_onnx_int8_layout.py [--cpus EPYC-Milan] [--size 1000] [--speed] [--json PATH]
(needs `apt-get install qemu-user` for the emulated rows; without it only this CPU's rows are written)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_json  # noqa: E402

import vlmcompress  # noqa: E402
from vlmcompress import cpu as cpu_facts  # noqa: E402
from vlmcompress.adapters import BUILTIN_TINY, adapter_for  # noqa: E402
from vlmcompress.evaluate import evaluate_dual_encoder, shapes_eval_rows  # noqa: E402
from vlmcompress.integrations import onnx as vx  # noqa: E402
from vlmcompress.models import load_model  # noqa: E402

LAYOUTS = {"u8s8": ("QInt8", False), "u8s8_rr": ("QInt8", True), "u8u8": ("QUInt8", False)}
REPLAY = Path(__file__).parent / "ort_replay.py"


def quantize_layouts(fp32: Path, target: Path) -> None:
    """`target/<layout>/<graph>` for every layout: every nn.Linear MatMul of the graph quantized."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for layout, (weights, reduce_range) in LAYOUTS.items():
        (target / layout).mkdir(parents=True, exist_ok=True)
        quantize_dynamic(str(fp32), str(target / layout / fp32.name), weight_type=getattr(QuantType, weights),
                         per_channel=True, reduce_range=reduce_range, nodes_to_quantize=sorted(vx.linear_nodes(fp32)),
                         op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})


def run_everywhere(folder: Path, jobs: list[dict], cpus: list[str]) -> dict[str, float]:
    """Run the jobs natively and under every emulated CPU; returns the seconds each took."""
    (folder / "jobs.json").write_text(json.dumps(jobs))
    seconds = {}
    for tag in ["native", *cpus]:
        prefix = [] if tag == "native" else ["qemu-x86_64", "-cpu", tag]
        start = time.perf_counter()
        subprocess.run([*prefix, sys.executable, str(REPLAY), str(folder), tag], check=True,
                       stderr=subprocess.DEVNULL)
        seconds[tag] = round(time.perf_counter() - start, 1)
    return seconds


def tower_agreement(name: str, work: Path, cpus: list[str]) -> dict:
    """A tiny random-init model with ToMe r=8: min cosine of the image graph's output rows against torch on the
    inputs of tests/test_onnx.py (batch 1 and 3)."""
    model = vlmcompress.apply({"model": name, "output": "unused", "stages": [{"method": "token_reduce", "r": 8}]},
                              save=False, progress=False)
    graph = next(g for g in vx.graphs_for(model, BUILTIN_TINY[name]) if g.name == "image_encoder")
    vx.export_graph(graph, work / "image_encoder.onnx")
    quantize_layouts(work / "image_encoder.onnx", work)
    jobs, refs = [], {}
    for batch in (1, 3):
        pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        np.savez(work / f"feeds_{batch}.npz", pixel_values=pixels.numpy())
        with torch.no_grad():
            refs[batch] = graph.module(pixel_values=pixels)
        jobs += [{"graph": f"{layout}/image_encoder.onnx", "feeds": f"feeds_{batch}.npz", "out": f"{layout}_{batch}.npy"}
                 for layout in LAYOUTS]
    seconds = run_everywhere(work, jobs, cpus)
    table = {}
    for tag in seconds:
        for layout in LAYOUTS:
            cosines = [torch.nn.functional.cosine_similarity(
                torch.from_numpy(np.load(work / tag / f"{layout}_{b}.npy")).flatten(1), refs[b].flatten(1), dim=-1)
                .min().item() for b in refs]
            table.setdefault(tag, {})[layout] = round(min(cosines), 5)
    return {"model": f"{name} + ToMe r=8 (random init)", "metric": "min cosine vs torch", "results": table}


def recall(name: str, size: int, work: Path, cpus: list[str]) -> dict:
    """A trained shapes teacher: recall@1 of every layout on `size` test pairs, against torch fp32."""
    model, processor = load_model(name)
    rows = shapes_eval_rows(model, size)
    reference = evaluate_dual_encoder(model, processor, rows)
    vx.export(model, adapter_for(model), work / "fp32", scheme="fp32", processor=processor)
    for graph in ("image_encoder", "text_encoder"):
        quantize_layouts(work / "fp32" / f"{graph}.onnx", work)
    onnx_model = vx.load_onnx(work / "fp32")
    calls: list[tuple[str, dict]] = []
    run = onnx_model._run

    def record(graph, **inputs):
        calls.append((graph, inputs))
        return run(graph, **inputs)

    onnx_model._run = record
    evaluate_dual_encoder(onnx_model, processor, rows)  # the feeds, in the evaluation's order
    jobs = []
    for i, (graph, inputs) in enumerate(calls):
        np.savez(work / f"feeds_{i}.npz", **{k: v.numpy() for k, v in inputs.items()})
        jobs += [{"graph": f"{layout}/{graph}.onnx", "feeds": f"feeds_{i}.npz", "out": f"{layout}_{i}.npy"}
                 for layout in LAYOUTS]
    seconds = run_everywhere(work, jobs, cpus)
    table = {}
    for tag in seconds:
        for layout in LAYOUTS:
            outputs = iter(torch.from_numpy(np.load(work / tag / f"{layout}_{i}.npy")) for i in range(len(calls)))
            onnx_model._run = lambda graph, **inputs: next(outputs)  # noqa: B023 (consumed in this iteration)
            got = evaluate_dual_encoder(onnx_model, processor, rows)
            table.setdefault(tag, {})[layout] = {k: got[k] for k in ("i2t_R@1", "t2i_R@1")}
    return {"model": name, "size": size, "metric": "recall@1",
            "torch_fp32": {k: reference[k] for k in ("i2t_R@1", "t2i_R@1")}, "results": table,
            "replay_seconds": seconds}


def speed(work: Path, batch_sizes: list[int], rounds: int) -> dict:
    """ViT-B/16 image encoder (random init, 224 px) in every layout on this CPU: ms per batch, interleaved (order
    rotated every round), min and median over rounds. The layouts share one graph structure (same ops, same
    initializer shapes and types), so they run the same kernels; this measures that on the host."""
    from common import vit_b16_clip
    from torch.utils import benchmark as torch_benchmark

    from vlmcompress.adapters import adapter_for

    model = vit_b16_clip()
    graph = next(g for g in vx.graphs_for(model, adapter_for(model)) if g.name == "image_encoder")
    vx.export_graph(graph, work / "image_encoder.onnx")
    quantize_layouts(work / "image_encoder.onnx", work)
    sessions = {layout: vx.session(work / layout / "image_encoder.onnx") for layout in LAYOUTS}
    table: dict = {}
    for batch in batch_sizes:
        feed = {"pixel_values": torch.randn(batch, 3, 224, 224).numpy()}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for r in range(rounds):
            order = list(sessions)[r % len(sessions):] + list(sessions)[:r % len(sessions)]
            for layout in order:
                timer = torch_benchmark.Timer(stmt="s.run(None, f)", globals={"s": sessions[layout], "f": feed})
                times[layout].append(timer.timeit(2).median * 1e3)
        table[str(batch)] = {k: {"ms_min": round(min(v), 1), "ms_median": round(sorted(v)[len(v) // 2], 1)}
                             for k, v in times.items()}
    return {"model": "ViT-B/16 image encoder (random init, 224 px)", "threads": torch.get_num_threads(),
            "rounds": rounds, "batch_sizes": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", nargs="*", default=["EPYC-Milan"], help="qemu CPU models to emulate")
    parser.add_argument("--models", nargs="*", default=["shapes-clip-small", "shapes-clip"])
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--speed", action="store_true", help="also time the layouts on ViT-B/16 on this CPU")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cpus = args.cpus if shutil.which("qemu-x86_64") else []
    if args.cpus and not cpus:
        print("qemu-x86_64 not found (apt-get install qemu-user): measuring this CPU only", file=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {"cpu": cpu_facts.describe(), "emulated": {c: "qemu-user " + subprocess.run(
        ["qemu-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0] for c in cpus},
        "layouts": {k: f"weights {'uint8' if w == 'QUInt8' else 'int8'}, {7 if r else 8} bits"
                    for k, (w, r) in LAYOUTS.items()},
        "chosen": {tag: vx.int8_format(cpu_facts.detect(with_torch=False)).to_dict() for tag in ["native"]},
        "date": time.strftime("%Y-%m-%d"), "towers": [], "recall": []}
    with tempfile.TemporaryDirectory(prefix="vlmc-int8-layout-") as tmp:
        for name in ("tiny-llava", "tiny-clip"):
            (Path(tmp) / name).mkdir()
            results["towers"].append(tower_agreement(name, Path(tmp) / name, cpus))
        for name in args.models:
            (Path(tmp) / name).mkdir()
            results["recall"].append(recall(name, args.size, Path(tmp) / name, cpus))
        if args.speed:
            (Path(tmp) / "vit").mkdir()
            results["speed_here"] = speed(Path(tmp) / "vit", [1, 8], args.rounds)
    write_json(results, args.json)


if __name__ == "__main__":
    main()
