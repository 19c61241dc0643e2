"""Speed of a LLaVA-shaped model at realistic size for this machine: uncompressed vs ToMe in the vision tower.

Random init (speed does not depend on the weights): a ViT-B/16 CLIP vision tower (224 px → 197 tokens), the
LLaVA MLP projector and a 12-layer, 768-wide Llama decoder (12 heads, 4 key/value heads, MLP 2048, vocabulary
32,000). Both models are saved as folders and measured by `vlmcompress bench` in one interleaved run: prefill of one
image plus a 32-token prompt, and 16 greedy decode steps.

    python benchmarks/bench_llava_shaped.py --json benchmarks/results/llava_shaped_tome.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

import vlmcompress
from vlmcompress.bench import benchmark
from common import write_json


def llava_shaped() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, image_size=224, patch_size=16)
    text = dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=12, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, tome_dir = Path(tmp) / "llava-base", Path(tmp) / "llava-tome"
        model = llava_shaped()
        model.save_pretrained(base_dir)
        vlmcompress.apply({"model": str(base_dir), "output": str(tome_dir),
                           "stages": [{"method": "token_reduce", "algorithm": "tome", "r": args.r}]},
                          progress=False)
        results = benchmark(str(base_dir), against=str(tome_dir), batch_sizes=(1,), repeats=args.repeats,
                            progress=False)
    results["setup"] = {"tome_r": args.r, "vision": "ViT-B/16, 197 tokens", "llm": "Llama 12 x 768, GQA 12/4"}
    write_json(results, args.json)


if __name__ == "__main__":
    main()
