"""Quantization on CPU: size on disk, speed and accuracy of every backend × scheme, on the model as loaded back.

Two parts, each writing JSON:

`--part speed`: a ViT-B/16-shaped CLIP vision tower (random init, 224 px → 197 tokens; built as in
`bench_vit_tome_prune.py`). Every variant is produced by `vlmcompress.apply` into a folder and timed *after*
`vlmcompress.load(folder)` (so a `compile:` option recorded in the checkpoint is applied as a user gets it):
`get_image_features` at batch 1 (latency) and batch 32 (throughput), variants interleaved (the order rotates every
round), min and median over `--rounds`, speed-ups against fp32 measured in the same run.

`--part llava-speed`: the same on the LLaVA-shaped model of `bench_llava_shaped.py` (ViT-B/16 tower, 12-layer
768-wide Llama): one prefill of an image plus a 64-token prompt, every component quantized; the error column is
that of the last-position logits.

`--part accuracy`: `shapes-clip` (the trained teacher) quantized by every backend × scheme (calibrated schemes use
`data.train`), reloaded, evaluated on the shapes test split (`--size` pairs): recall@1 both ways, zero-shot shape.
`--llava` adds `shapes-llava` VQA accuracy for the quantizers that apply to the whole model.

    flock /tmp/vlmc-bench.lock python benchmarks/bench_quantize.py --part speed --json benchmarks/results/quantize_vit_b16.json
    flock /tmp/vlmc-bench.lock python benchmarks/bench_quantize.py --part llava-speed --json benchmarks/results/quantize_llava_shaped.json
    flock /tmp/vlmc-bench.lock python benchmarks/bench_quantize.py --part accuracy --json benchmarks/results/quantize_shapes.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils import benchmark
from common import vit_b16_clip, write_json
from transformers import CLIPModel

import vlmcompress
from vlmcompress.adapters.base import pooled
from vlmcompress.bench import machine_info

TRAIN = {"builtin": "shapes", "split": "train", "size": 256}


def q(**kw) -> dict:
    return {"method": "quantize", **kw}


# the default (backend auto picks the path for this CPU: table + probe; the chosen path is in the JSON) and every
# torch int8 path `scheme: int8` chooses among, pinned (8-bit activations unless the CPU needs 7: see
# vlmcompress/stages/quantize/int8_paths.py); timed and evaluated alike
INT8_PATHS: dict[str, dict] = {
    "scheme: int8 (default)": q(),
    "torch int8 x86 engine, 7-bit activations (default before #19)": q(backend="torch", scheme="int8_dynamic",
                                                                       engine="x86", reduce_range=True),
    "torch int8 x86 engine": q(backend="torch", scheme="int8_dynamic", engine="x86"),
    "torch int8 fbgemm engine": q(backend="torch", scheme="int8_dynamic", engine="fbgemm"),
    "torch int8 onednn engine": q(backend="torch", scheme="int8_dynamic", engine="onednn"),
}

# name → quantize stage (None: the fp32 model itself)
SPEED_VARIANTS: dict[str, dict | None] = {
    "fp32": None,
    **INT8_PATHS,
    "torchao int8_dynamic (eager)": q(backend="torchao", scheme="int8_dynamic", compile=False),
    "torchao int8_dynamic + compile": q(backend="torchao", scheme="int8_dynamic", compile=True),
    # the reference: ONNX Runtime's dynamic int8 of the exported tower, timed as loaded back (out/onnx)
    "onnxruntime int8": q(backend="onnxruntime", scheme="int8"),
    "torchao int8_weight_only": q(backend="torchao", scheme="int8_weight_only"),
    "torchao int4_weight_only (g128)": q(backend="torchao", scheme="int4_weight_only"),
    "quanto int8_weight_only": q(backend="quanto", scheme="int8_weight_only"),
    "quanto int4_weight_only": q(backend="quanto", scheme="int4_weight_only"),
    "neural_compressor int8_weight_only (rtn)": q(backend="neural_compressor", scheme="int8_weight_only"),
    "neural_compressor int4_weight_only (rtn, g32)": q(backend="neural_compressor", scheme="int4_weight_only"),
    # the full pipeline of recipes/clip_prune_tome_int8.yaml, at ViT-B/16 scale (50 % of heads and MLP, r = 16)
    "prune 50 % + ToMe r=16 (fp32)": [{"method": "structured_prune", "ratio": {"vision": 0.5}},
                                      {"method": "token_reduce", "r": 16}],
    "prune 50 % + ToMe r=16 + int8": [{"method": "structured_prune", "ratio": {"vision": 0.5}},
                                      {"method": "token_reduce", "r": 16}, q()],
}

ACCURACY_VARIANTS: dict[str, dict | None] = {
    "fp32": None,
    **INT8_PATHS,
    "torchao int8_dynamic (eager)": q(backend="torchao", scheme="int8_dynamic", compile=False),
    "torchao int8_weight_only": q(backend="torchao", scheme="int8_weight_only"),
    "torchao int4_weight_only (g32)": q(backend="torchao", scheme="int4_weight_only", group_size=32),
    "quanto int8_weight_only": q(backend="quanto", scheme="int8_weight_only"),
    "quanto int4_weight_only": q(backend="quanto", scheme="int4_weight_only"),
    "quanto int8_static (calibrated)": q(backend="quanto", scheme="int8_static"),
    "neural_compressor int8_weight_only (rtn)": q(backend="neural_compressor", scheme="int8_weight_only"),
    "neural_compressor int4_weight_only (rtn, g32)": q(backend="neural_compressor", scheme="int4_weight_only"),
    "neural_compressor int4_weight_only (gptq, g32)": q(backend="neural_compressor", scheme="int4_weight_only",
                                                        algorithm="gptq"),
    "neural_compressor int8_weight_only (gptq)": q(backend="neural_compressor", scheme="int8_weight_only",
                                                   algorithm="gptq"),
}


def disk_mb(folder: Path) -> float:
    """The weights a user deploys: the ONNX graphs when the folder has them, else the safetensors."""
    # the encoder graphs, not Optimum's whole-model model.onnx, which repeats them
    files = list((folder / "onnx").glob("*_encoder.onnx*")) if (folder / "onnx").is_dir() else folder.glob("*.safetensors")
    return round(sum(f.stat().st_size for f in files) / 2**20, 2)


def write_variant(name: str, stages: dict | list | None, folder: Path, model: torch.nn.Module | None = None,
                  source: str = "in-memory", data: dict | None = None) -> dict:
    """Run the stage(s) into `folder` (or save fp32 there); returns what `apply` reported for the last stage."""
    if stages is None:
        if model is not None:
            model.save_pretrained(folder)
        else:
            from vlmcompress.zoo import zoo_folder

            shutil.copytree(zoo_folder(source), folder)
        return {}
    recipe = {"model": source, "output": str(folder), "stages": stages if isinstance(stages, list) else [stages]}
    if data:
        recipe["data"] = data
    t = time.perf_counter()
    out = vlmcompress.apply(recipe, model=model, progress=False, overwrite=True)
    report = out.vlmcompress_report
    details = report["stages"][-1]["details"]
    return {"apply_seconds": round(time.perf_counter() - t, 1), "params": report["params_after"],
            "layers": details.get("layers_per_component"), "skipped": len(details.get("skipped", {}))}


def load_back(folder: Path, fp32: bool, model_class=CLIPModel) -> torch.nn.Module:
    if fp32:
        return model_class.from_pretrained(folder).eval()
    if (folder / "onnx").is_dir():
        from vlmcompress.models import load_model

        return load_model(str(folder / "onnx"))[0]
    return vlmcompress.load(folder)


def chosen_path(folder: Path) -> dict | None:
    """What `scheme: int8` resolved to in a written folder (path, source, probe times), or None."""
    config = json.loads((folder / "config.json").read_text())
    resolved = (config.get("quantization") or {}).get("resolved")
    return {k: resolved[k] for k in ("path", "source", "probe_ms", "options") if k in resolved} if resolved else None


def encode(model, pixels):
    with torch.inference_mode():
        return pooled(model.get_image_features(pixel_values=pixels))


def llava_prefill(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One prefill (KV cache on, logits of the last position, as `generate` runs it) → `[batch, vocab]` logits."""
    with torch.inference_mode():
        return model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]


@dataclass(frozen=True)
class Workload:
    """What the speed part times: a model builder, the variants, one call and its inputs at a batch size."""

    name: str
    build: Callable[[], torch.nn.Module]
    variants: dict[str, dict | list | None]
    call: Callable[[torch.nn.Module, object], torch.Tensor]
    inputs: Callable[[torch.nn.Module, int], object]
    model_class: type
    quantize_components: list[str] | None  # None: the stage's default (every component)


def llava_inputs(model, batch_size: int) -> dict[str, torch.Tensor]:
    from bench_llava_reduction_speed import prompt

    inputs = prompt(model, batch_size)
    return {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def workloads() -> dict[str, Workload]:
    from bench_llava_shaped import llava_shaped
    from transformers import LlavaForConditionalGeneration

    # ONNX Runtime exports LLaVA's vision tower only: no comparable prefill
    plain = {k: v for k, v in SPEED_VARIANTS.items() if not isinstance(v, list) and "onnxruntime" not in k}
    return {
        "speed": Workload("CLIP ViT-B/16 get_image_features (vision tower + projection)", vit_b16_clip,
                          SPEED_VARIANTS, encode, lambda model, bs: torch.randn(bs, 3, 224, 224), CLIPModel,
                          ["vision"]),
        "llava-speed": Workload("LLaVA-shaped prefill: one 224 px image (196 tokens) + 64-token prompt, KV cache on, "
                                "logits of the last position; every component quantized", llava_shaped, plain,
                                llava_prefill, llava_inputs, LlavaForConditionalGeneration, None),
    }


def speed(args, workload: Workload) -> dict:
    work = Path(tempfile.mkdtemp(prefix="vlmc-bench-quantize-"))
    results = {"machine": machine_info(torch.device("cpu")), "workload": workload.name,
               "rounds": args.rounds, "variants": {}}
    models = {}
    only_bs1: set[str] = set()  # far too slow at batch 1 to be timed at batch 32
    try:
        for name, stage in workload.variants.items():
            if not selected(name, args):
                continue
            folder = work / f"v{len(models)}"
            if workload.quantize_components and isinstance(stage, dict):
                stage = stage | {"components": workload.quantize_components}
            elif workload.quantize_components and stage is not None and stage[-1]["method"] == "quantize":
                stage = [*stage[:-1], stage[-1] | {"components": workload.quantize_components}]
            info = write_variant(name, stage, folder, model=workload.build())
            models[name] = load_back(folder, stage is None, workload.model_class)
            results["variants"][name] = {"size_on_disk_mb": disk_mb(folder), **info}
            if stage is not None and chosen_path(folder):
                results["variants"][name]["int8_path"] = chosen_path(folder)
            print(name, results["variants"][name], flush=True)
        for bs, calls in ((1, args.bs1_calls), (32, 1)):
            pixels = workload.inputs(models["fp32"], bs)
            encode = workload.call
            reference = encode(models["fp32"], pixels)
            warm: dict[str, float] = {}
            for name, model in models.items():
                if bs > 1 and name in only_bs1:
                    results["variants"][name][f"bs{bs}"] = {"note": "not measured: more than 8x slower than fp32 "
                                                                    "and 5 s at batch 1"}
                    continue
                # warm-up: twice (the first call may compile or initialise a backend; the second is the one
                # compared with fp32's to spot kernels too slow to repeat), and the error vs fp32
                for _ in range(2):
                    t = time.perf_counter()
                    out = encode(model, pixels)
                    warm[name] = time.perf_counter() - t
                    if warm[name] > 120:  # one call is enough to know it is too slow
                        break
                rel = ((out - reference).norm() / reference.norm()).item()
                results["variants"][name].setdefault("rel_error_vs_fp32", round(rel, 5))
                results["variants"][name][f"bs{bs}_warmup_s"] = round(warm[name], 1)
                print(f"bs{bs} warm-up {name}: {warm[name]:.1f} s", flush=True)
            # a variant whose kernel is far too slow at this batch size is reported from one call, not repeated
            slow = {n for n, w in warm.items() if w > max(5.0, 8 * warm["fp32"])}
            only_bs1 |= slow
            times: dict[str, list[float]] = {name: [] for name in models if name not in only_bs1}
            order = list(times)
            for r in range(args.rounds):
                for name in order[r % len(order):] + order[: r % len(order)]:
                    timer = benchmark.Timer(stmt="encode(m, x)", num_threads=torch.get_num_threads(),
                                            globals={"encode": encode, "m": models[name], "x": pixels})
                    times[name].append(timer.timeit(calls).mean * 1e3)
                print(f"bs{bs} round {r + 1}/{args.rounds}", flush=True)
            base = times["fp32"]
            for name in slow:
                ms = warm[name] * 1e3
                results["variants"][name][f"bs{bs}"] = {
                    "ms_min": round(ms, 1), "ms_median": round(ms, 1), "samples_per_s": round(bs * 1e3 / ms, 2),
                    "speedup_min": round(min(base) / ms, 3), "speedup_median": round(statistics.median(base) / ms, 3),
                    "note": "one call (more than 8x slower than fp32 and 5 s): not repeated"}
            for name, ts in times.items():
                results["variants"][name][f"bs{bs}"] = {
                    "ms_min": round(min(ts), 1), "ms_median": round(statistics.median(ts), 1),
                    "samples_per_s": round(bs * 1e3 / statistics.median(ts), 2),
                    "speedup_min": round(min(base) / min(ts), 3),
                    "speedup_median": round(statistics.median(base) / statistics.median(ts), 3)}
            if args.json:  # partial results survive an interrupted run
                args.json.with_suffix(".partial.json").write_text(json.dumps(results, indent=2) + "\n")
        results["machine_after"] = {"load_average_1m": machine_info(torch.device("cpu"))["load_average_1m"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def selected(name: str, args) -> bool:
    """fp32 always; otherwise a variant whose name holds an `--only` substring (if given) and no `--skip` one."""
    if name == "fp32":
        return True
    only = [x for x in (args.only or "").split(",") if x]
    skip = [x for x in (args.skip or "").split(",") if x]
    return (not only or any(x in name for x in only)) and not any(x in name for x in skip)


def accuracy(args) -> dict:
    from vlmcompress.evaluate import evaluate_dual_encoder, evaluate_vqa, shapes_eval_rows
    from vlmcompress.models import load_model

    work = Path(tempfile.mkdtemp(prefix="vlmc-bench-quantize-acc-"))
    results = {"machine": machine_info(torch.device("cpu")), "model": "shapes-clip", "size": args.size,
               "variants": {}}
    rows = None
    try:
        for i, (name, stage) in enumerate(ACCURACY_VARIANTS.items()):
            if not selected(name, args):
                continue
            folder = work / f"clip{i}"
            info = write_variant(name, stage, folder, source="shapes-clip", data={"train": TRAIN})
            model, processor = load_model(str(folder))
            rows = rows if rows is not None else shapes_eval_rows(model, args.size)
            t = time.perf_counter()
            scores = evaluate_dual_encoder(model, processor, rows)
            keep = {k: scores[k] for k in ("i2t_R@1", "t2i_R@1", "zero_shot_shape")}
            keep["recall@1"] = round((scores["i2t_R@1"] + scores["t2i_R@1"]) / 2, 4)  # mean of both directions
            results["variants"][name] = {"size_on_disk_mb": disk_mb(folder), **info, **keep,
                                         "eval_seconds": round(time.perf_counter() - t, 1)}
            print(name, results["variants"][name], flush=True)
        base = results["variants"]["fp32"]
        for v in results["variants"].values():
            v["recall@1_change_points"] = round(100 * (v["recall@1"] - base["recall@1"]), 2)
        if args.llava:
            results["llava"] = {}
            vqa_rows = None
            for i, (name, stage) in enumerate(ACCURACY_VARIANTS.items()):
                if not selected(name, args):
                    continue
                if stage is not None and (stage.get("backend") == "quanto" and stage.get("scheme") == "int8_static"
                                          or "reduce_range" in stage or stage.get("algorithm") == "gptq"):
                    continue
                folder = work / f"llava{i}"
                info = write_variant(name, stage, folder, source="shapes-llava", data={"train": TRAIN})
                model, processor = load_model(str(folder))
                vqa_rows = vqa_rows if vqa_rows is not None else shapes_eval_rows(model, args.vqa_size)
                scores = evaluate_vqa(model, processor, vqa_rows)
                results["llava"][name] = {"size_on_disk_mb": disk_mb(folder), **info,
                                          "vqa_accuracy": scores["vqa_accuracy"]}
                print("llava", name, results["llava"][name], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def speed_table(results: dict) -> str:
    """Markdown rows of the speed part."""
    def cells(b: dict) -> str:
        if "ms_min" not in b:
            return "not measured (too slow at bs1) | – | –"
        rate = b.get("samples_per_s", b.get("images_per_s"))
        return (f"{b['ms_min']:.0f} / {b['ms_median']:.0f} | {rate:.2f} | "
                f"{b['speedup_min']:.2f}× / {b['speedup_median']:.2f}×")

    lines = ["| variant | size on disk | bs1 ms (min / median) | bs1 per s | bs1 speed-up (min / median) "
             "| bs32 ms (min / median) | bs32 per s | bs32 speed-up (min / median) | rel. error vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        lines.append(f"| {name} | {v['size_on_disk_mb']:.1f} MB | {cells(v['bs1'])} | {cells(v['bs32'])} | "
                     f"{v['rel_error_vs_fp32']:.4f} |")
    return "\n".join(lines)


def accuracy_table(results: dict) -> str:
    """Markdown rows of the accuracy part."""
    lines = ["| variant | size on disk | i2t R@1 | t2i R@1 | mean R@1 (change, points) | zero-shot shape |",
             "|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        lines.append(f"| {name} | {v['size_on_disk_mb']:.2f} MB | {v['i2t_R@1']:.4f} | {v['t2i_R@1']:.4f} | "
                     f"{v['recall@1']:.4f} ({v['recall@1_change_points']:+.2f}) | {v['zero_shot_shape']:.4f} |")
    if results.get("llava"):
        lines += ["", "| variant (shapes-llava) | size on disk | VQA exact match |", "|---|---|---|"]
        for name, v in results["llava"].items():
            lines.append(f"| {name} | {v['size_on_disk_mb']:.2f} MB | {v['vqa_accuracy']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["speed", "llava-speed", "accuracy"], required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bs1-calls", type=int, default=3, help="calls per batch-1 measurement")
    parser.add_argument("--size", type=int, default=5000, help="shapes test pairs for accuracy")
    parser.add_argument("--llava", action="store_true", help="also shapes-llava VQA accuracy")
    parser.add_argument("--vqa-size", type=int, default=2000)
    parser.add_argument("--only", default=None, help="comma-separated substrings of the variants to run (fp32 always "
                                                     "runs: speed-ups are against it)")
    parser.add_argument("--skip", default=None, help="comma-separated substrings of variants to leave out")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--table", type=Path, default=None, help="print the markdown table of a results JSON and exit")
    args = parser.parse_args()
    if args.table:
        results = json.loads(args.table.read_text())
        print(accuracy_table(results) if args.part == "accuracy" else speed_table(results))
        return
    results = accuracy(args) if args.part == "accuracy" else speed(args, workloads()[args.part])
    write_json(results, args.json)


if __name__ == "__main__":
    main()
