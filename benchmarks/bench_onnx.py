"""ONNX Runtime (fp32 and dynamic int8, with and without ToMe) against PyTorch fp32 eager on CPU.

Speed: a ViT-B/16-shaped CLIP vision tower (random init: speed does not depend on the weights; 224 px, 197 tokens,
12 layers, 768 wide, projection 512, as in bench_vit_tome_prune.py). Every ONNX variant is produced by
`vlmcompress.apply` with `quantize: {backend: onnxruntime}` into a folder and timed *as loaded back* from that folder
(`load_model(out/onnx)`); the PyTorch variants are loaded back from the same folders' fp32 checkpoints. The timed
call is vlmcompress bench's `image` workload (`get_image_features(pixel_values)`: vision tower + projection), built
by the same code, interleaved (variant order rotated every round), `torch.utils.benchmark.Timer`, min and median.
torch's built-in dynamic int8 (`torch.ao.quantization.quantize_dynamic` on the nn.Linear layers) is timed alongside
as the in-process reference.

Accuracy (`--accuracy`): shapes-clip on the shapes test split (5,000 pairs, folds of 1,000), recall@1 of the
PyTorch model and of the ONNX Runtime fp32 and int8 exports, through the same evaluation code.

    flock /tmp/vlmc-bench.lock .venv/bin/python benchmarks/bench_onnx.py --rounds 5 --accuracy --threads 2 \
        --json benchmarks/results/onnx_runtime.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils import benchmark as torch_benchmark

import vlmcompress
from vlmcompress.adapters import adapter_for
from vlmcompress.bench import EXPORT_WORKLOADS, _calls_per_measurement, machine_info, peak_memory_mb
from vlmcompress.models import load_model
from vlmcompress.integrations import onnx as vx
from common import vit_b16_clip, write_json

TOME = {"method": "token_reduce", "algorithm": "tome", "r": 16}


def export(root: Path, name: str, stages: list[dict]) -> tuple[Path, float]:
    """`apply` the stages to a fresh ViT-B/16 CLIP into `root/name`; returns the folder and the seconds it took."""
    start = time.perf_counter()
    vlmcompress.apply({"model": "in-memory", "output": str(root / name), "stages": stages}, model=vit_b16_clip(),
                      progress=False)
    return root / name, round(time.perf_counter() - start, 1)


def build_variants(root: Path) -> tuple[dict, dict]:
    """`{variant: model}` loaded back from the output folders, and `{variant: facts}` (files, export seconds)."""
    fp32_dir, fp32_s = export(root, "fp32", [{"method": "quantize", "backend": "onnxruntime", "scheme": "fp32"}])
    int8_dir, int8_s = export(root, "int8", [{"method": "quantize", "backend": "onnxruntime", "scheme": "int8"}])
    tome_dir, tome_s = export(root, "tome_int8", [TOME, {"method": "quantize", "backend": "onnxruntime",
                                                         "scheme": "int8"}])
    torch_fp32, _ = load_model(str(fp32_dir))  # the fp32 checkpoint beside onnx/ is the unchanged model
    torch_tome, _ = load_model(str(tome_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        torch_int8 = torch.ao.quantization.quantize_dynamic(load_model(str(fp32_dir))[0], {torch.nn.Linear},
                                                            dtype=torch.qint8)
    models = {"torch fp32 (eager)": torch_fp32,
              "onnxruntime fp32": load_model(str(fp32_dir / "onnx"))[0],
              "onnxruntime int8": load_model(str(int8_dir / "onnx"))[0],
              "torch int8 dynamic (torch.ao)": torch_int8,
              "torch fp32 + ToMe r16": torch_tome,
              "onnxruntime int8 + ToMe r16": load_model(str(tome_dir / "onnx"))[0]}
    image = lambda d: (d / "onnx" / "image_encoder.onnx").stat().st_size  # noqa: E731
    vision_bytes = sum(p.numel() * p.element_size() for p in torch_fp32.vision_model.parameters())
    vision_bytes += sum(p.numel() * p.element_size() for p in torch_fp32.visual_projection.parameters())
    facts = {"torch fp32 (eager)": {"image_encoder_weights_bytes": vision_bytes,
                                    "checkpoint_bytes": (fp32_dir / "model.safetensors").stat().st_size},
             "onnxruntime fp32": {"image_encoder_onnx_bytes": image(fp32_dir), "export_seconds": fp32_s},
             "onnxruntime int8": {"image_encoder_onnx_bytes": image(int8_dir), "export_seconds": int8_s},
             "torch int8 dynamic (torch.ao)": {},
             "torch fp32 + ToMe r16": {},
             "onnxruntime int8 + ToMe r16": {"image_encoder_onnx_bytes": image(tome_dir), "export_seconds": tome_s}}
    for name, folder in (("onnxruntime fp32", fp32_dir), ("onnxruntime int8", int8_dir),
                         ("onnxruntime int8 + ToMe r16", tome_dir)):
        spec = vx.read_spec(json.loads((folder / "onnx" / "config.json").read_text()))
        graph = spec["graphs"]["image_encoder"]
        facts[name] |= {"check_vs_torch": graph.get("check") or graph["check_fp32"],
                        "quantized_modules": len(graph.get("quantized_modules", [])),
                        "tokens_per_layer": graph["tokens_per_layer"]}
    return models, facts


def time_variants(models: dict, batch_sizes: list[int], rounds: int) -> dict:
    workload = EXPORT_WORKLOADS["clip"][0]  # image: get_image_features(pixel_values)
    cpu = torch.device("cpu")
    out = {name: {} for name in models}
    for bs in batch_sizes:
        cells = {}
        for name, model in models.items():
            fn = workload.build(model, adapter_for(model), bs, cpu)
            cells[name] = (fn, _calls_per_measurement(fn, cpu))
        times = {name: [] for name in models}
        order = list(models)
        for r in range(rounds):
            for name in order[r % len(order):] + order[: r % len(order)]:
                fn, calls = cells[name]
                timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                times[name].append(timer.timeit(calls).mean * 1e3)
            print(f"bs{bs} round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.0f} ms" for n, t in times.items()),
                  flush=True)
        base = times[order[0]]
        for name, ts in times.items():
            out[name][f"bs{bs}"] = {
                "ms_min": round(min(ts), 1), "ms_median": round(statistics.median(ts), 1),
                "ms_all": [round(t, 1) for t in ts], "images_per_s": round(bs * 1e3 / statistics.median(ts), 2),
                "speedup_median": round(statistics.median(base) / statistics.median(ts), 3),
                "speedup_min": round(min(base) / min(ts), 3),
                "peak_memory_mb": peak_memory_mb(cells[name][0], cpu)}
    return out


def accuracy(root: Path, size: int) -> dict:
    """recall@1 of shapes-clip: PyTorch, ONNX Runtime fp32 and int8 (5,000 test pairs by default)."""
    from vlmcompress.evaluate import evaluate_dual_encoder, shapes_eval_rows

    result = {}
    teacher, processor = load_model("shapes-clip")
    rows = shapes_eval_rows(teacher, size)
    for scheme in ("fp32", "int8"):
        out = root / f"shapes-{scheme}"
        vlmcompress.apply({"model": "shapes-clip", "output": str(out),
                           "stages": [{"method": "quantize", "backend": "onnxruntime", "scheme": scheme}]},
                          progress=False)
        model, proc = load_model(str(out / "onnx"))
        result[f"onnxruntime {scheme}"] = evaluate_dual_encoder(model, proc, rows)
    result["torch fp32"] = evaluate_dual_encoder(teacher, processor, rows)
    for r in result.values():
        r["recall@1"] = round((r["i2t_R@1"] + r["t2i_R@1"]) / 2, 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--accuracy", action="store_true", help="also shapes-clip recall@1 (5,000 test pairs)")
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # ONNX Runtime sessions are opened with torch's thread count
    machine = machine_info(torch.device("cpu"))
    import onnxruntime

    machine |= {"onnxruntime": onnxruntime.__version__,
                "onnxruntime_threads": f"intra_op_num_threads={torch.get_num_threads()}, inter_op 1, no spinning"}
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        models, facts = build_variants(Path(tmp))
        results = {"machine": machine, "what": {
            "workload": EXPORT_WORKLOADS["clip"][0].description + ", ViT-B/16-shaped CLIP (random init)",
            "timing": f"interleaved, {args.rounds} rounds, torch.utils.benchmark.Timer, ms per batch; speed-ups "
                      "against torch fp32 eager in the same round set",
            "models": "ONNX Runtime variants loaded back from the `apply` output folders' onnx/; torch variants "
                      "from their fp32 checkpoints"},
            "variants": facts}
        timings = time_variants(models, [int(b) for b in args.batch_sizes.split(",")], args.rounds)
        for name, t in timings.items():
            results["variants"][name] |= t
        results["machine"]["load_average_1m_after"] = round(__import__("os").getloadavg()[0], 2)
        if args.accuracy:
            results["shapes_clip_accuracy"] = accuracy(Path(tmp), args.size)
    write_json(results, args.json)


if __name__ == "__main__":
    main()
