"""Built-in teachers trained on the `shapes` world, shipped as safetensors inside the package.

`shapes-clip` is a CLIP-architecture dual encoder (80 px, patch 8 → 100 patch tokens + CLS); `shapes-clip-small`
is a seconds-to-train variant for unit tests. Each is produced by a seeded, documented command:

    vlmcompress zoo train shapes-clip            # rewrites the shipped weights' folder (or --output DIR)

A shipped folder whose files are missing or do not match `manifest.json` is never used: the model is retrained into
`$VLMCOMPRESS_CACHE` (default `~/.cache/vlmcompress`) instead, with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import shapes
from .errors import ModelLoadError

ZOO_DIR = Path(__file__).parent / "zoo_weights"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_TOKENS = ("<pad>", "<s>", "<unk>", "</s>")  # ids 0..3; eos 3 (CLIP treats eos id 2 as a legacy case)


@dataclass(frozen=True)
class ClipRecipe:
    """Architecture and training schedule of a shapes dual encoder."""

    image_size: int = 80
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    projection_dim: int = 128
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: float = 0.05
    weight_decay: float = 0.05
    seed: int = 0


ZOO: dict[str, ClipRecipe] = {
    "shapes-clip": ClipRecipe(),
    "shapes-clip-small": ClipRecipe(image_size=32, patch_size=4, vision_hidden=48, vision_layers=2, vision_heads=4,
                                    text_hidden=48, text_layers=1, text_heads=4, projection_dim=48, steps=400,
                                    batch_size=64, lr=3e-3),
}


def tokenizer():
    """Word-level tokenizer over the shapes vocabulary; adds `<s>` and `</s>` around every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in shapes.vocabulary():
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=48)


def processor(recipe: ClipRecipe):
    from transformers import CLIPImageProcessor, CLIPProcessor

    size = recipe.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer())


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """`[B, S, S, 3]` uint8 → `[B, 3, S, S]` normalised like the saved `CLIPImageProcessor` (no resize needed)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def build_clip(recipe: ClipRecipe) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    tok = tokenizer()
    vision = dict(hidden_size=recipe.vision_hidden, intermediate_size=4 * recipe.vision_hidden,
                  num_hidden_layers=recipe.vision_layers, num_attention_heads=recipe.vision_heads,
                  image_size=recipe.image_size, patch_size=recipe.patch_size)
    text = dict(hidden_size=recipe.text_hidden, intermediate_size=4 * recipe.text_hidden,
                num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
                vocab_size=len(tok), max_position_embeddings=48, bos_token_id=1, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(recipe.seed)
    return CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=recipe.projection_dim))


def train_clip(recipe: ClipRecipe, on_step: Callable[[int, float], None] | None = None) -> nn.Module:
    """Contrastive training on freshly generated `shapes` train examples (seeded, deterministic on one thread
    count). AdamW, linear warm-up then cosine decay, gradient clipping at 1."""
    model = build_clip(recipe).train()
    tok = tokenizer()
    config = shapes.ShapesConfig(image_size=recipe.image_size)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    warm = max(1, int(recipe.warmup * recipe.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 *
                                                 (1 + math.cos(math.pi * min(1.0, s / recipe.steps))))
    for step in range(recipe.steps):
        rows = shapes.generate("train", recipe.batch_size, seed=recipe.seed, config=config,
                               start=step * recipe.batch_size)
        batch = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=pixel_values(np.stack([r["image"] for r in rows])))
        labels = torch.arange(len(rows))
        # several images can share a caption: mask exact duplicates out of each other's negatives
        texts = [r["text"] for r in rows]
        same = torch.tensor([[a == b for b in texts] for a in texts]) & ~torch.eye(len(rows), dtype=torch.bool)
        logits = out.logits_per_image.masked_fill(same, -1e4)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if on_step:
            on_step(step, float(loss.detach()))
    return model.eval()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_zoo_model(name: str, model: nn.Module, folder: Path, seconds: float) -> None:
    recipe = ZOO[name]
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor(recipe).save_pretrained(folder)
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
    manifest = {"name": name, "recipe": asdict(recipe), "train_seconds": round(seconds, 1),
                "threads": torch.get_num_threads(), "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def verify(folder: Path) -> bool:
    """True when every file listed in the folder's manifest exists with the recorded hash."""
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        return False
    try:
        files = json.loads(manifest_file.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all((folder / n).is_file() and _sha256(folder / n) == h for n, h in files.items())


def cache_dir() -> Path:
    return Path(os.environ.get("VLMCOMPRESS_CACHE", Path.home() / ".cache" / "vlmcompress"))


def zoo_folder(name: str, retrain: Callable[[str, Path], None] | None = None) -> Path:
    """The verified folder of built-in teacher `name`: the shipped one, else the cache, else retrained into the
    cache (`retrain(name, folder)` is called; it defaults to `train_and_save`)."""
    if name not in ZOO:
        raise ModelLoadError(f"unknown built-in teacher {name!r}; expected one of: {', '.join(ZOO)}")
    for folder in (ZOO_DIR / name, cache_dir() / name):
        if verify(folder):
            return folder
    folder = cache_dir() / name
    print(f"vlmcompress: the shipped weights of {name} are missing or corrupt; retraining into {folder}")
    (retrain or train_and_save)(name, folder)
    return folder


def train_and_save(name: str, folder: Path, progress: bool = True) -> dict:
    recipe = ZOO[name]
    start = time.perf_counter()
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(TextColumn(f"training {name}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                      TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()) as bar:
            task = bar.add_task(name, total=recipe.steps, loss=float("nan"))
            model = train_clip(recipe, on_step=lambda s, loss: bar.update(task, completed=s + 1, loss=loss))
    else:
        model = train_clip(recipe)
    seconds = time.perf_counter() - start
    save_zoo_model(name, model, folder, seconds)
    return {"name": name, "seconds": round(seconds, 1), "folder": str(folder)}
