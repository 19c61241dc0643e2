"""Ways of training the half vision + half text `shapes-clip` student that `distill` does not offer, each against
the plain student in the same run: does any of them learn faster than abrupt layer removal with the task loss?

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_distill_variants.py --steps 300 \\
        --json benchmarks/results/distill_variants_300.json

Every variant starts from the teacher (vision layers [0, 3] and text layer [0] kept, as `distill` builds the
student) and trains with distill's own optimiser and schedule (`TrainConfig`: AdamW without decay on biases and
norms, linear warm-up then cosine, gradient clipping at 1) at batch 128, lr 2e-3, weight decay 0.05:

- `abrupt`: the dropped layers removed at step 0, the contrastive task loss (`distill` with `logits: 0, hidden: 0`)
- `fade`: the dropped text layer kept with its residual update scaled by α = 1 → 0 over the first half of the
  steps, then removed (progressive layer dropping, after BERT-of-Theseus' progressive module replacing)
- `locked-image`: only the one-layer text tower trains, against the teacher's frozen 4-layer vision tower (LiT's
  locked-image tuning); the student keeps the teacher's vision
- `hard-negatives`: each image also sees its caption with one colour, shape or size word changed as a negative
  (NegCLIP-style; the shapes captions' attribute words)
- `logit-scale`: the student's logit scale reset to CLIP's initial 1 / 0.07 (the teacher's is about 62)
- `text-reinit`: the one kept text layer re-initialised (a freshly seeded model's layer), everything else from the
  teacher: is the teacher's layer 0 a worse start for a one-layer tower than random weights?
- `mimic-init`: before the joint training, 200 text-only steps (256 captions each, about a minute) pull the
  one-layer text tower onto the teacher's unit text embeddings (`bench_text_mimic.py`), so the joint training
  starts from the text function closest to the teacher's that one layer holds

`--eval-every N` adds R@1 on 1,000 test pairs every N steps (`recall_trace`).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import shapes_recall, write_json  # noqa: E402

BATCH_SIZE, LR = 128, 2e-3
VARIANTS = ("abrupt", "fade", "locked-image", "hard-negatives", "logit-scale", "text-reinit", "mimic-init")


def attribute_swapped(caption: str, rng: random.Random) -> str:
    """`caption` with one colour, shape or size word replaced by another of its kind: a negative that differs from
    the positive in one attribute, the kind of near-duplicate that 2,000-pair retrieval has to tell apart."""
    from vlmcompress.data import shapes

    kinds = (tuple(shapes.COLOURS), shapes.SHAPES, shapes.SIZES)
    words = caption.split()
    slots = [(i, kind) for i, w in enumerate(words) for kind in kinds if w in kind]
    i, kind = rng.choice(slots)
    words[i] = rng.choice([w for w in kind if w != words[i]])
    return " ".join(words)


def fade_hook(state: dict):
    """Forward hook scaling a layer's residual update: output = input + α · (layer(input) − input)."""
    def hook(module, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        o = out[0] if isinstance(out, tuple) else out
        mixed = h + state["alpha"] * (o - h)
        return (mixed, *out[1:]) if isinstance(out, tuple) else mixed
    return hook


def contrastive(model, processor, rows, rng: random.Random | None) -> torch.Tensor:
    """distill's task loss (CLIP's symmetric loss, equal captions masked out of each other's negatives); with `rng`,
    an attribute-swapped negative caption per image joins the image-to-text side."""
    from vlmcompress.adapters.base import same_text_mask
    from vlmcompress.adapters.clip import clip_train_outputs, dual_encoder_batch

    if rng is None:
        return clip_train_outputs(model, dual_encoder_batch(processor, rows, padding=True)).loss
    texts = [r["text"] for r in rows]
    extra = [attribute_swapped(t, rng) for t in texts]
    batch = processor(text=texts + extra, images=[r["image"] for r in rows], padding=True, return_tensors="pt")
    out = model(**batch)
    n = len(rows)
    same = same_text_mask(texts + extra)[:n] & ~torch.eye(n, 2 * n, dtype=torch.bool)
    image_to_text = model.logit_scale.exp() * out.image_embeds @ out.text_embeds.t()  # [n, 2n]
    image_to_text = image_to_text.masked_fill(same, -1e4)
    labels = torch.arange(n)
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(image_to_text[:, :n].t(), labels)) / 2


def train_variant(name: str, teacher, processor, steps: int, seed: int = 0, eval_every: int | None = None,
                  lr: float = LR) -> dict:
    from vlmcompress.adapters import BUILTIN_TINY
    from vlmcompress.data import batches
    from vlmcompress.data.schema import DataSource
    from vlmcompress.stages.distill.student import keep_layers
    from vlmcompress.train import TrainConfig
    from vlmcompress.train.trainer import no_decay

    cfg = TrainConfig(steps=steps, batch_size=BATCH_SIZE, lr=lr, weight_decay=0.05, warmup=0.05)
    torch.manual_seed(seed)
    model = copy.deepcopy(teacher).train()
    stacks = BUILTIN_TINY["tiny-clip"].layer_stacks(model)
    fade = {"alpha": 1.0}
    if name != "locked-image":
        keep_layers(model, stacks["vision"], [0, 3])
    if name == "fade":
        model.text_model.encoder.layers[1].register_forward_hook(fade_hook(fade), with_kwargs=True)
    else:
        keep_layers(model, stacks["text"], [0])
    if name == "text-reinit":
        torch.manual_seed(seed + 1)
        fresh = type(model)(copy.deepcopy(model.config))
        model.text_model.encoder.layers[0].load_state_dict(fresh.text_model.encoder.layers[0].state_dict())
    began = time.perf_counter()  # minutes count the mimic-init's text-only steps too
    if name == "mimic-init":
        from bench_text_mimic import mimic_text

        mimic_text(model, teacher, processor, 200, 256, lr, log=False)
    if name == "logit-scale":
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / 0.07))
    trained = [(n, p) for n, p in model.named_parameters()
               if name != "locked-image" or n.startswith(("text_model.", "text_projection.", "logit_scale"))]
    model.requires_grad_(False)
    for _, p in trained:
        p.requires_grad_(True)
    if name == "locked-image":
        model.vision_model.eval()
    opt = torch.optim.AdamW([{"params": [p for n, p in trained if not no_decay(n, p)],
                              "weight_decay": cfg.weight_decay},
                             {"params": [p for n, p in trained if no_decay(n, p)], "weight_decay": 0.0}], lr=cfg.lr)
    fade_steps, rng = max(1, steps // 2), random.Random(seed) if name == "hard-negatives" else None
    trace, recall_trace = [], []
    for step, rows in enumerate(batches(DataSource(builtin="shapes", split="train"), 80, seed, steps * cfg.batch_size,
                                          cfg.batch_size)):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * cfg.lr_factor(step, steps)
        if name == "fade":
            fade["alpha"] = max(0.0, 1 - step / fade_steps)
            if step == fade_steps:  # α is 0 from here on: the layer goes, as the saved student has it
                keep_layers(model, stacks["text"], [0])
        loss = contrastive(model, processor, rows, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            trace.append({"step": step + 1, "loss": round(loss.item(), 4)})
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            model.eval()
            recall_trace.append({"step": step + 1, "recall@1": shapes_recall(model, processor, 1000)["recall@1"]})
            print(name, recall_trace[-1], flush=True)
            model.train()
            if name == "locked-image":
                model.vision_model.eval()
    model.eval()
    layers = {c: len(model.get_submodule(s.layers_path)) for c, s in stacks.items()}
    return {"variant": name, "layers": layers, "minutes": round((time.perf_counter() - began) / 60, 1),
            "loss_trace": trace, "recall_trace": recall_trace} | shapes_recall(model, processor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--lr", type=float, default=LR, help="peak learning rate")
    parser.add_argument("--eval-every", type=int, default=None, help="R@1 on 1,000 test pairs every N steps")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from vlmcompress.measure.machine import machine_info
    from vlmcompress.models import load_model

    teacher, processor = load_model("shapes-clip")
    teacher.requires_grad_(False)
    rows = [{"variant": "teacher"} | shapes_recall(teacher, processor)]
    for name in args.variants.split(","):
        if name not in VARIANTS:
            sys.exit(f"--variants: {name!r} is not one of {', '.join(VARIANTS)}")
        rows.append(train_variant(name, teacher, processor, args.steps, eval_every=args.eval_every,
                                  lr=args.lr))
        rows[-1]["of_teacher"] = round(rows[-1]["recall@1"] / rows[0]["recall@1"], 4)
        print({k: v for k, v in rows[-1].items() if k not in ("loss_trace", "recall_trace")}, flush=True)
    write_json({"machine": machine_info(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"),
                "command": " ".join(sys.argv), "steps": args.steps, "batch_size": BATCH_SIZE, "lr": args.lr,
                "threads": torch.get_num_threads(), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
