"""How much retrieval accuracy the shapes teacher loses when tokens are removed naively vs. by ToMe.

The built-in world must be sensitive to what compression removes: dropping half of the patch tokens by a naive rule
after the first layer must cost the teacher at least 3 points of R@1, while ToMe at a similar token budget keeps most
of it. Variants (no retraining): full model; keep CLS + the 50 % of patch tokens with the largest L2 norm after
layer 0;
keep a random 50 % after layer 0; ToMe with r chosen so that about half of the tokens are gone after layer 0 and
the count keeps falling.

    python benchmarks/bench_shapes_sensitivity.py --model shapes-clip --size 5000 \
        --json benchmarks/results/shapes_sensitivity.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import vlmcompress
from vlmcompress.evaluate import evaluate_dual_encoder, shapes_eval_rows
from vlmcompress.models import load_model
from common import write_json


class DropAfterLayer:
    """Forward hook on encoder layer 0 that keeps CLS and `keep` of the patch tokens chosen by `rule`."""

    def __init__(self, keep: float, rule: str, seed: int = 0):
        self.keep, self.rule, self.generator = keep, rule, torch.Generator().manual_seed(seed)

    def __call__(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        cls, patches = hidden[:, :1], hidden[:, 1:]
        n = max(1, int(patches.shape[1] * self.keep))
        if self.rule == "norm":
            idx = patches.norm(dim=-1).topk(n, dim=1).indices
        else:
            idx = torch.stack([torch.randperm(patches.shape[1], generator=self.generator)[:n]
                               for _ in range(patches.shape[0])])
        kept = patches.gather(1, idx[..., None].expand(-1, -1, patches.shape[-1]))
        return torch.cat([cls, kept], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model, processor = load_model(args.model)
    rows = shapes_eval_rows(model, args.size)
    layers = model.vision_model.encoder.layers
    n0 = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 + 1
    results = {"model": args.model, "size": args.size, "date": time.strftime("%Y-%m-%d"), "variants": {}}

    def record(name, m, tokens):
        r = evaluate_dual_encoder(m, processor, rows)
        results["variants"][name] = {"tokens_per_layer": tokens, "i2t_R@1": r["i2t_R@1"], "t2i_R@1": r["t2i_R@1"],
                                     "i2t_R@5": r["i2t_R@5"], "zero_shot_shape": r["zero_shot_shape"]}
        print(name, results["variants"][name], flush=True)

    record("full", model, [n0] * (len(layers) + 1))
    for rule in ("norm", "random"):
        handle = layers[0].register_forward_hook(DropAfterLayer(0.5, rule))
        half = 1 + (n0 - 1) // 2
        record(f"drop50_{rule}_after_layer0", model, [n0] + [half] * len(layers))
        handle.remove()
    r = (n0 - 1) // 2  # ToMe: half the tokens after layer 0 (the 50 % bound), then the clamp keeps halving
    for schedule in ([r] + [0] * (len(layers) - 1), [r // 2] * len(layers)):
        fresh, _ = load_model(args.model)
        tome = vlmcompress.apply({"model": args.model, "output": "unused",
                                  "stages": [{"method": "token_reduce", "r": schedule}]},
                                 model=fresh, save=False, progress=False)
        tokens = tome.vlmcompress_report["tokens_per_layer"]["vision"]
        record(f"tome_r{schedule}", tome, tokens)
    write_json(results, args.json)


if __name__ == "__main__":
    main()
