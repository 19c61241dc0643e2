"""VQA accuracy vs prefill GFLOPs of FastV, VisionZip and PruMerge on the shapes-llava teacher (training-free).

Every point is `vlmcompress.apply` of one `token_reduce` stage on the teacher, evaluated on the shapes test split:
exact-match VQA with greedy 3-token answers to `user: <image> QUESTION assistant:` prompts built by the saved
processor, batches of 100 left-padded prompts (`vlmcompress.evaluate.answer_questions`, as `vlmcompress eval`).
Budgets are the fraction of the image tokens the language model keeps (FastV: after decoder layer K; VisionZip and
PruMerge: at the vision feature layer, so also the vision layers after it); PruMerge's adaptive mode picks its own
count per image (its mean and range are reported). GFLOPs per sample: `FlopCounterMode` over one prefill (vision tower +
projector + language model, logits of the last position) of the first test question's prompt; for the adaptive
mode, of that image alone. The uncompressed row carries the no-image, majority and chance baselines.

    python benchmarks/bench_llava_reduction_accuracy.py --model shapes-llava --size 2000 \
        --json benchmarks/results/llava_reduction_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import vlmcompress
from vlmcompress.bench import count_gflops, machine_info
from vlmcompress.evaluate import VQA_PROMPT, answer_questions, evaluate_vqa, shapes_eval_rows
from vlmcompress.modeling.llava_tokens import llava_image_token_counts
from vlmcompress.models import load_model


def settings(ratios: list[float]) -> dict[str, dict]:
    out = {}
    for p in ratios:
        tag = f"{p:g}"
        for k in (1, 2):
            out[f"fastv K={k} keep={tag}"] = {"algorithm": "fastv", "layer": k, "keep_ratio": p}
        out[f"visionzip keep={tag}"] = {"algorithm": "visionzip", "keep_ratio": p}
        out[f"prumerge keep={tag}"] = {"algorithm": "prumerge", "mode": "fixed", "keep_ratio": p}
        out[f"prumerge+ keep={tag}"] = {"algorithm": "prumerge", "mode": "fixed", "keep_ratio": p, "plus": True}
        out[f"visionzip keep={tag} keep_positions"] = {"algorithm": "visionzip", "keep_ratio": p,
                                                       "keep_positions": True}
        out[f"prumerge keep={tag} keep_positions"] = {"algorithm": "prumerge", "mode": "fixed", "keep_ratio": p,
                                                      "keep_positions": True}
        out[f"prumerge keep={tag} order=raster"] = {"algorithm": "prumerge", "mode": "fixed", "keep_ratio": p,
                                                    "order": "raster"}
    out["prumerge adaptive"] = {"algorithm": "prumerge", "mode": "adaptive"}
    out["prumerge+ adaptive"] = {"algorithm": "prumerge", "mode": "adaptive", "plus": True}
    out["prumerge adaptive keep_positions"] = {"algorithm": "prumerge", "mode": "adaptive", "keep_positions": True}
    return out


def prefill_gflops(model, processor, row) -> float:
    batch = processor(text=[VQA_PROMPT.format(question=row["question"])], images=[row["image"]], return_tensors="pt")
    with torch.inference_mode():
        return count_gflops(lambda: model(**batch, logits_to_keep=1))


class LlmTokens:
    """Sequence length entering the first decoder layer and its number of image tokens, per forward."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self.handle = model.model.language_model.layers[0].register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:  # prefill only
            self.lengths.append(hidden.shape[1])

    def close(self):
        self.handle.remove()


def image_tokens_in_llm(model, processor, rows, batch_size: int) -> list[int]:
    """Image tokens the language model receives, per image (PruMerge adaptive: chosen per image)."""
    counts = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        pixels = processor.image_processor(images=[r["image"] for r in chunk], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            if hasattr(model, "_encode_images"):  # a compressed model: the count it hands to the language model
                _, kept = model._encode_images(pixels, {})
            else:
                kept = int(model.model.get_image_features(pixel_values=pixels).pooler_output[0].shape[0])
        counts.extend(kept.tolist() if isinstance(kept, torch.Tensor) else [kept] * len(chunk))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--ratios", default="0.5,0.25,0.125")
    parser.add_argument("--only", default=None, help="comma-separated substrings: run the matching settings only "
                                                     "(and add them to an existing --json file)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ratios = [float(x) for x in args.ratios.split(",")]
    base, processor = load_model(args.model)
    rows = shapes_eval_rows(base, args.size)
    questions = [r["question"] for r in rows]
    images = [r["image"] for r in rows]
    t0 = time.perf_counter()
    reference = evaluate_vqa(base, processor, rows)
    results = {"machine": machine_info(torch.device("cpu")), "model": args.model, "size": args.size,
               "what": __doc__.split("\n\n")[1].replace("\n", " "), "points": {}}
    results["points"]["uncompressed"] = {
        "setting": None, "vqa_accuracy": reference["vqa_accuracy"], "baselines": reference,
        "gflops_per_sample": round(prefill_gflops(base, processor, rows[0]), 5),
        "image_tokens_in_llm": image_tokens_in_llm(base, processor, rows[:100], 100)[0],
        "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(results["points"]["uncompressed"]), flush=True)
    full = results["points"]["uncompressed"]["gflops_per_sample"]
    for name, setting in settings(ratios).items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        t0 = time.perf_counter()
        fresh, _ = load_model(args.model)
        model = vlmcompress.apply({"model": args.model, "output": "unused",
                                   "stages": [{"method": "token_reduce", **setting}]},
                                  model=fresh, processor=processor, save=False, progress=False)
        predicted = answer_questions(model, processor, images, questions)
        accuracy = round(sum(p == r["answer"] for p, r in zip(predicted, rows)) / len(rows), 4)
        by_type = {}
        for kind in sorted({r["qtype"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["qtype"] == kind]
            by_type[kind] = round(sum(predicted[i] == rows[i]["answer"] for i in idx) / len(idx), 4)
        gflops = prefill_gflops(model, processor, rows[0])
        block = model.config.token_reduction
        tower = block["towers"][0]
        if setting["algorithm"] == "fastv":
            kept = tower["tokens_per_layer"][-1]
        elif block.get("data_dependent"):
            per_image = image_tokens_in_llm(model, processor, rows, 100)
            kept = round(sum(per_image) / len(per_image), 2)
        else:  # VisionZip hands CLS on; LLaVA's "default" strategy drops it otherwise
            kept = llava_image_token_counts(model.config)[1]
        point = {"setting": setting, "vqa_accuracy": accuracy, "vqa_by_type": by_type,
                 "gflops_per_sample": round(gflops, 5),
                 "gflops_fraction": round(gflops / full, 4), "image_tokens_in_llm": kept,
                 "seconds": round(time.perf_counter() - t0, 1)}
        if block.get("data_dependent"):
            point["image_tokens_range"] = [min(per_image), max(per_image)]
            point["gflops_note"] = "of the first test image alone (the count depends on the image)"
        results["points"][name] = point
        print(name, json.dumps(point), flush=True)
    if args.only and args.json and args.json.exists():  # keep the other points of an earlier run
        earlier = json.loads(args.json.read_text())
        earlier["points"].update({k: v for k, v in results["points"].items() if k != "uncompressed"})
        earlier.setdefault("runs", []).append({"only": args.only, "machine": results["machine"]})
        results = earlier
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
