"""Why VisionZip / PruMerge lose position questions on shapes-llava: the image tokens' position ids.

Drops the same image tokens two ways and asks the same questions: the `keep` patches with the highest CLS
attention at the vision feature layer (VisionZip's dominant tokens, no contextual ones) reach the language model
(1) at consecutive positions, as VisionZip and PruMerge hand them on, or (2) at the positions they had in the full
prompt (as FastV keeps them). Everything else is equal: greedy 3-token answers with the KV cache, exact match on the
shapes test split, batches of 100 left-padded prompts.

    python benchmarks/bench_llava_positions.py --size 1000 --keep 50 --json benchmarks/results/llava_positions.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlmcompress.evaluate import VQA_PROMPT, shapes_eval_rows
from vlmcompress.models import load_model
from vlmcompress.modeling.token_ops import gather_tokens


@torch.no_grad()
def answers(model, processor, rows, keep: int | None, original_positions: bool) -> list[str]:
    config = model.config
    image_id = config.image_token_id
    vision = model.model.vision_tower
    layer = config.vision_feature_layer % (config.vision_config.num_hidden_layers + 1)
    out = []
    for i in range(0, len(rows), 100):
        chunk = rows[i:i + 100]
        batch = processor(text=[VQA_PROMPT.format(question=r["question"]) for r in chunk],
                          images=[r["image"] for r in chunk], padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        v = vision(pixel_values=batch["pixel_values"], output_hidden_states=True, output_attentions=True)
        features = model.model.multi_modal_projector(v.hidden_states[layer][:, 1:])  # [B, P, D], CLS dropped
        image = ids == image_id
        full_pos = (mask.cumsum(1) - 1).clamp_min(0)
        keep_idx = torch.arange(ids.shape[1]).expand(len(chunk), -1)
        if keep is not None:
            cls = v.attentions[layer - 1][:, :, 0, 1:].mean(dim=1)  # the feature layer's CLS attention
            patches = cls.argsort(dim=1, descending=True, stable=True)[:, :keep].sort(dim=1).values
            features = gather_tokens(features, patches)
            start = image.int().argmax(dim=1, keepdim=True)  # one image per prompt
            text = (~image).nonzero()[:, 1].view(len(chunk), -1)
            keep_idx = torch.cat([text, start + patches], dim=1).sort(dim=1).values
        ids, mask = ids.gather(1, keep_idx), mask.gather(1, keep_idx)
        pos = full_pos.gather(1, keep_idx) if original_positions else (mask.cumsum(1) - 1).clamp_min(0)
        embeds = model.model.get_input_embeddings()(ids).masked_scatter((ids == image_id)[..., None],
                                                                        features.flatten(0, 1))
        lm = model.model.language_model
        o = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        cache, tokens = o.past_key_values, []
        token = model.lm_head(o.last_hidden_state[:, -1:]).argmax(-1)
        for _ in range(3):
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            pos = pos[:, -1:] + 1
            o = lm(input_ids=token, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            token = model.lm_head(o.last_hidden_state[:, -1:]).argmax(-1)
        out += [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in torch.cat(tokens, 1)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--keep", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model, processor = load_model(args.model)
    model.set_attn_implementation("eager")  # the vision tower's attention probabilities
    rows = shapes_eval_rows(model, args.size)
    result = {"model": args.model, "size": args.size, "keep": args.keep, "points": {}}
    for name, keep, original in (("all image tokens", None, False),
                                 (f"top-{args.keep} by CLS attention, consecutive positions", args.keep, False),
                                 (f"top-{args.keep} by CLS attention, original positions", args.keep, True)):
        predicted = answers(model, processor, rows, keep, original)
        point = {"vqa_accuracy": round(sum(p == r["answer"] for p, r in zip(predicted, rows)) / len(rows), 4)}
        for kind in sorted({r["qtype"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["qtype"] == kind]
            point[kind] = round(sum(predicted[i] == rows[i]["answer"] for i in idx) / len(idx), 4)
        result["points"][name] = point
        print(name, point, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
