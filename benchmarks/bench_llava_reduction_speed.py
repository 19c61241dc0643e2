"""Prefill speed of FastV, VisionZip, PruMerge and CrossGET on a LLaVA-shaped model, at 50% and 25% of the image tokens.

Random init (speed does not depend on the weights; the token counts of the fixed-count settings do not either): the
LLaVA-shaped model of `bench_llava_shaped.py` (ViT-B/16 CLIP vision tower, 224 px → 196 patches, feature layer -2;
12-layer 768-wide Llama, 12 heads / 4 key-value heads, MLP 2048). Workload: one prefill of one image plus a 64-token
prompt (BOS, 196 image placeholders, 63 text tokens) with the KV cache on and the logits of the last position only,
as `generate` runs it. Each variant is `vlmcompress.apply` of one `token_reduce` stage:

- `fastv-<p>`: `algorithm: fastv, layer: 2, keep_ratio: p` (image tokens dropped after decoder layer 2);
- `visionzip-<p>`: `algorithm: visionzip, keep_ratio: p` (dominant:contextual 54:10, at the feature layer);
- `prumerge-<p>`: `algorithm: prumerge, mode: fixed, keep_ratio: p` (PruMerge with the extra token);
- `crossget-<p>`: `algorithm: crossget, keep_ratio: p` (merging in every vision layer; p of the tokens are left after
  the last one, so the language model receives a little more than p of the image tokens: feature layer -2).

All variants and the uncompressed model are timed interleaved (order rotated every round) with
`torch.utils.benchmark.Timer`; GFLOPs per sample of the whole prefill come from `FlopCounterMode` (vision tower,
projector, language model). Speed-ups are ratios of medians and of minimums against the uncompressed model;
realization = speed-up (medians) ÷ FLOPs reduction.

    flock /tmp/vlmc-bench.lock python benchmarks/bench_llava_reduction_speed.py --repeats 11 \
        --json benchmarks/results/llava_reduction_speed.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
from bench_llava_shaped import llava_shaped
from common import write_json
from torch.utils import benchmark as torch_benchmark

import vlmcompress
from vlmcompress.bench import count_gflops, machine_info

PROMPT_TOKENS = 64  # text tokens, BOS included
WARMUP_CALLS = 3


def variants(ratios: list[float]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"uncompressed": []}
    for p in ratios:
        tag = f"{round(p * 100)}%"
        out[f"fastv-{tag}"] = [{"method": "token_reduce", "algorithm": "fastv", "layer": 2, "keep_ratio": p}]
        out[f"visionzip-{tag}"] = [{"method": "token_reduce", "algorithm": "visionzip", "keep_ratio": p}]
        out[f"prumerge-{tag}"] = [{"method": "token_reduce", "algorithm": "prumerge", "mode": "fixed",
                                   "keep_ratio": p}]
        out[f"crossget-{tag}"] = [{"method": "token_reduce", "algorithm": "crossget", "keep_ratio": p}]
    return out


def prompt(model, batch_size: int) -> dict[str, torch.Tensor]:
    config = model.config
    vision = config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    text = torch.randint(5, config.image_token_id, (batch_size, PROMPT_TOKENS), generator=g)
    text[:, 0] = config.text_config.bos_token_id
    image = torch.full((batch_size, n_image), config.image_token_id)
    ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "use_cache": True,
            "logits_to_keep": 1}


def prefill(model, batch_size: int):
    inputs = prompt(model, batch_size)

    def run():
        with torch.inference_mode():
            return model(**inputs)

    return run


def image_tokens_in_llm(model, batch_size: int) -> list[int]:
    """Sequence length entering each decoder layer (hooks), for one call."""
    seen: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(
        (a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True)
        for layer in model.model.language_model.layers]
    try:
        prefill(model, batch_size)()
    finally:
        for h in hooks:
            h.remove()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.5,0.25")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ratios = [float(x) for x in args.ratios.split(",")]
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    machine = machine_info(torch.device("cpu"))
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "llava-shaped"
        llava_shaped().save_pretrained(base_dir)
        for name, stages in variants(ratios).items():
            if stages:
                models[name] = vlmcompress.apply({"model": str(base_dir), "output": "unused", "stages": stages},
                                                 save=False, progress=False)
            else:
                models[name] = _plain(base_dir)
    results: dict = {"machine": machine, "setup": {
        "vision": "CLIP ViT-B/16, 224 px, 197 tokens, feature layer -2", "llm": "Llama 12 x 768, GQA 12/4, MLP 2048",
        "prompt": f"BOS + 196 image placeholders + {PROMPT_TOKENS - 1} text tokens; KV cache on, logits_to_keep=1",
        "timing": f"torch.utils.benchmark.Timer, {torch.get_num_threads()} threads, inference_mode, "
                  f"{WARMUP_CALLS} warm-up calls, {args.repeats} interleaved rounds (order rotated)",
        "variants": variants(ratios)}, "models": {}, "ratios": {}}
    for name, model in models.items():
        results["models"][name] = {"gflops_per_sample": round(count_gflops(prefill(model, 1)), 4),
                                   "sequence_entering_llm_layers": image_tokens_in_llm(model, 1),
                                   "batch_sizes": {}}
    for bs in sizes:
        fns = {name: prefill(model, bs) for name, model in models.items()}
        for fn in fns.values():
            for _ in range(WARMUP_CALLS):
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        order = list(fns)
        for r in range(args.repeats):
            for name in order[r % len(order):] + order[: r % len(order)]:
                timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fns[name]},
                                              num_threads=torch.get_num_threads())
                times[name].append(timer.timeit(1).mean * 1e3)
        for name, ms in times.items():
            results["models"][name]["batch_sizes"][str(bs)] = {
                "ms_median": round(statistics.median(ms), 2), "ms_min": round(min(ms), 2),
                "ms_all": [round(t, 2) for t in ms]}
    base = results["models"]["uncompressed"]
    for name, m in results["models"].items():
        if name == "uncompressed":
            continue
        flops = base["gflops_per_sample"] / m["gflops_per_sample"]
        rows = {}
        for bs, t in m["batch_sizes"].items():
            tb = base["batch_sizes"][bs]
            speedup = tb["ms_median"] / t["ms_median"]
            rows[bs] = {"speedup_median": round(speedup, 3), "speedup_min": round(tb["ms_min"] / t["ms_min"], 3),
                        "realization": round(speedup / flops, 3)}
        results["ratios"][name] = {"flops_reduction": round(flops, 3), "batch_sizes": rows}
    results["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    write_json(results, args.json)


def _plain(folder: Path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder).eval()


if __name__ == "__main__":
    main()
