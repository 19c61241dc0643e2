"""What the benchmark scripts share: the ViT-B/16-shaped CLIP tower, shapes-clip's recall and writing results as
JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel


def vit_b16_clip() -> CLIPModel:
    """A random-init CLIP whose vision tower is ViT-B/16 at 224 px (197 tokens, 12 layers, 768 wide); the text tower
    is tiny (speed does not depend on the weights, and only image encoding is timed)."""
    torch.manual_seed(0)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                bos_token_id=1, eos_token_id=3, pad_token_id=0)
    return CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=512)).eval()


def shapes_recall(model, processor, size: int = 2000) -> dict:
    """R@1 both ways and their mean on the first `size` `shapes` test pairs (what the distill benchmarks compare)."""
    from vlmcompress.accuracy import measure
    from vlmcompress.data import load_rows
    from vlmcompress.data.schema import DataSource

    acc = measure(model, processor, "clip", load_rows(DataSource(builtin="shapes", split="test", size=size), model))
    return {key: acc[key] for key in ("i2t_R@1", "t2i_R@1", "recall@1")}


def write_json(results: dict, path: Path | None) -> None:
    """Print `results` and, when `path` is given, write them there (parents created)."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
