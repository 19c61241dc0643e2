"""Built-in teachers trained on the `shapes` world, shipped as safetensors inside the package.

`shapes-clip` is a CLIP-architecture dual encoder (80 px, patch 8 → 100 patch tokens + CLS); `shapes-clip-small`
is a seconds-to-train variant for unit tests. Each is produced by a seeded, documented command:

    vlmcompress zoo train shapes-clip            # rewrites the shipped weights' folder (or --output DIR)

A shipped folder whose files are missing or do not match `manifest.json` is never used: the model is retrained into
`$VLMCOMPRESS_CACHE` (default `~/.cache/vlmcompress`) instead, with a message saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import batches, shapes
from .data.schema import DataSource
from .errors import ModelLoadError
from .progress import Progress

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


@dataclass(frozen=True)
class LlavaRecipe:
    """A shapes VQA model: the vision tower of a shapes CLIP teacher + MLP projector + a small Llama decoder."""

    vision_from: str = "shapes-clip"
    image_size: int = 80
    patch_size: int = 8
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    steps: int = 2400
    batch_size: int = 64
    lr: float = 1e-3
    vision_lr_scale: float = 0.1
    warmup: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0


ZOO: dict[str, ClipRecipe | LlavaRecipe] = {
    "shapes-clip": ClipRecipe(),
    "shapes-clip-small": ClipRecipe(image_size=32, patch_size=4, vision_hidden=48, vision_layers=2, vision_heads=4,
                                    text_hidden=48, text_layers=1, text_heads=4, projection_dim=48, steps=400,
                                    batch_size=64, lr=3e-3),
    "shapes-llava": LlavaRecipe(),
    "shapes-llava-small": LlavaRecipe(vision_from="shapes-clip-small", image_size=32, patch_size=4, text_hidden=48,
                                      text_layers=1, text_heads=4, text_kv_heads=2, text_intermediate=96, steps=300),
}
PROMPT = shapes.VQA_PROMPT


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


def llava_tokenizer():
    """Word-level tokenizer for the VQA prompts: `<image>` placeholder, `user:` / `assistant:` turns, `<s>` first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ("<image>", "user:", "assistant:"))}
    for word in shapes.vocabulary():
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left", model_max_length=256,
                                   extra_special_tokens={"image_token": "<image>"})


def _image_processor(size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def processor(recipe: ClipRecipe | LlavaRecipe):
    from transformers import CLIPProcessor, LlavaProcessor

    if isinstance(recipe, LlavaRecipe):
        return LlavaProcessor(image_processor=_image_processor(recipe.image_size), tokenizer=llava_tokenizer(),
                              patch_size=recipe.patch_size, vision_feature_select_strategy="default",
                              image_token="<image>", num_additional_image_tokens=1,
                              chat_template=shapes.VQA_CHAT_TEMPLATE)
    return CLIPProcessor(image_processor=_image_processor(recipe.image_size), tokenizer=tokenizer())


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


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """The teachers' learning-rate multiplier at step `step` (0-based) of `steps`: linear warm-up over the first
    `warmup` fraction, then cosine decay to 0 (the shipped weights were trained with exactly this expression)."""
    warm = max(1, int(warmup * steps))
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))


def _train_loop(model: nn.Module, opt: torch.optim.Optimizer, recipe, config: shapes.ShapesConfig,
                loss_fn: Callable[[list[dict]], torch.Tensor], on_step: Callable[[int, float], None] | None) -> None:
    """`recipe.steps` steps on freshly generated train examples (step i sees examples i·B … (i+1)·B - 1):
    linear warm-up then cosine decay of every group's learning rate, gradient clipping at 1."""
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, recipe.steps, recipe.warmup))
    source = DataSource(builtin="shapes", split="train")
    stream = batches(source, config.image_size, recipe.seed, recipe.steps * recipe.batch_size, recipe.batch_size)
    for step, rows in enumerate(stream):
        loss = loss_fn(rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if on_step:
            on_step(step, float(loss.detach()))


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

    def loss_fn(rows: list[dict]) -> torch.Tensor:
        batch = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=pixel_values(np.stack([r["image"] for r in rows])))
        labels = torch.arange(len(rows))
        # several images can share a caption: mask exact duplicates out of each other's negatives
        texts = [r["text"] for r in rows]
        same = torch.tensor([[a == b for b in texts] for a in texts]) & ~torch.eye(len(rows), dtype=torch.bool)
        logits = out.logits_per_image.masked_fill(same, -1e4)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

    _train_loop(model, opt, recipe, config, loss_fn, on_step)
    return model.eval()


def build_llava(recipe: LlavaRecipe, vision_state: dict | None = None) -> nn.Module:
    """A LLaVA model whose vision tower copies `vision_state` (a shapes CLIP teacher's `vision_model`)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    teacher = ZOO[recipe.vision_from]
    tok = llava_tokenizer()
    vision = dict(model_type="clip_vision_model", hidden_size=teacher.vision_hidden,
                  intermediate_size=4 * teacher.vision_hidden, num_hidden_layers=teacher.vision_layers,
                  num_attention_heads=teacher.vision_heads, image_size=recipe.image_size, patch_size=recipe.patch_size)
    text = dict(model_type="llama", hidden_size=recipe.text_hidden, intermediate_size=recipe.text_intermediate,
                num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
                num_key_value_heads=recipe.text_kv_heads, vocab_size=len(tok), max_position_embeddings=256,
                bos_token_id=1, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(recipe.seed)
    image_token = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    if vision_state is not None:
        model.model.vision_tower.load_state_dict(vision_state)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 3
    return model


def vqa_batch(rows: list[dict], recipe: LlavaRecipe, with_answers: bool) -> dict[str, torch.Tensor]:
    """Tokenised prompts (left-padded, one `<image>` per patch) and, for training, answer-only labels."""
    tok = llava_tokenizer()
    patches = (recipe.image_size // recipe.patch_size) ** 2
    prompts = [PROMPT.format(question=r["question"]).replace("<image>", " ".join(["<image>"] * patches))
               for r in rows]
    texts = [f"{p} {r['answer']} </s>" for p, r in zip(prompts, rows)] if with_answers else prompts
    batch = tok(texts, padding=True, return_tensors="pt")
    out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
           "pixel_values": pixel_values(np.stack([r["image"] for r in rows]))}
    if with_answers:
        labels = torch.full_like(batch["input_ids"], -100)
        for i, r in enumerate(rows):
            n = len(r["answer"].split()) + 1  # answer words + </s>, at the end of the left-padded row
            labels[i, -n:] = batch["input_ids"][i, -n:]
        out["labels"] = labels
    return out


def train_llava(recipe: LlavaRecipe, on_step: Callable[[int, float], None] | None = None) -> nn.Module:
    """Next-token loss on the answers of freshly generated shapes questions; the vision tower starts from the
    CLIP teacher and learns at `vision_lr_scale` × the rate of the projector and decoder."""
    from safetensors.torch import load_file

    teacher_dir = zoo_folder(recipe.vision_from)
    state = load_file(str(teacher_dir / "model.safetensors"))
    vision_state = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    model = build_llava(recipe, vision_state).train()
    config = shapes.ShapesConfig(image_size=recipe.image_size)
    vision = list(model.model.vision_tower.parameters())
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    opt = torch.optim.AdamW([{"params": vision, "lr": recipe.lr * recipe.vision_lr_scale},
                             {"params": rest, "lr": recipe.lr}], weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    _train_loop(model, opt, recipe, config, lambda rows: model(**vqa_batch(rows, recipe, with_answers=True)).loss,
                on_step)
    return model.eval()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_zoo_model(name: str, model: nn.Module, folder: Path, seconds: float) -> None:
    recipe = ZOO[name]
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor(recipe).save_pretrained(folder)
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
    from . import cpu

    # float sums run in a different order on another instruction set, so retraining is bitwise only on the
    # capability (and thread count) recorded here; tests/test_teachers.py compares within a tolerance elsewhere
    manifest = {"name": name, "recipe": asdict(recipe), "train_seconds": round(seconds, 1),
                "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "cpu": cpu.detect().label(), "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def verify(folder: Path) -> bool:
    """True when every file listed in the folder's manifest exists with the recorded hash, and the folder is the
    shipped teacher (its files hash to `zoo_hashes.SHIPPED_SHA256`, kept in the package) or, outside the shipped
    folder, a teacher retrained for the same recipe (its manifest names the package's recipe: a retrain on another
    CPU gives other bytes)."""
    from .zoo_hashes import SHIPPED_SHA256

    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        return False
    try:
        manifest = json.loads(manifest_file.read_text())
        files, name = manifest["files"], manifest["name"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    if not all((folder / n).is_file() and _sha256(folder / n) == h for n, h in files.items()):
        return False
    if files == SHIPPED_SHA256.get(name):
        return True
    if folder.resolve().parent == ZOO_DIR.resolve() or name not in ZOO:
        return False
    return manifest.get("recipe") == json.loads(json.dumps(asdict(ZOO[name])))


def cache_dir() -> Path:
    return Path(os.environ.get("VLMCOMPRESS_CACHE", Path.home() / ".cache" / "vlmcompress"))


def zoo_folder(name: str, retrain: Callable[[str, Path], None] | None = None, config_only: bool = False) -> Path:
    """The verified folder of built-in teacher `name`: the shipped one, else the cache, else retrained into the
    cache (`retrain(name, folder)` is called; it defaults to `train_and_save`). `config_only` (a check: `validate`,
    `--dry-run`): the shipped folder for its config alone, weights unverified, never retraining or writing."""
    if name not in ZOO:
        raise ModelLoadError(f"unknown built-in teacher {name!r}; expected one of: {', '.join(ZOO)}")
    if config_only and (ZOO_DIR / name / "config.json").is_file():
        return ZOO_DIR / name
    for folder in (ZOO_DIR / name, cache_dir() / name):
        if verify(folder):
            return folder
    if config_only:
        raise ModelLoadError(f"the built-in teacher {name} has no config in this installation (its shipped files are "
                             "missing); reinstall vlmcompress, or run apply, which retrains it")
    folder = cache_dir() / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(folder.parent / f".{name}.lock"):  # concurrent first uses: one trains, the others wait
        if verify(folder):
            return folder
        tmp = folder.parent / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"vlmcompress: the shipped weights of {name} are missing or corrupt; retraining into {folder}")
        (retrain or train_and_save)(name, tmp)
        if not verify(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelLoadError(f"retraining {name} did not produce files matching their manifest; run "
                                 f"`vlmcompress zoo train {name}` to see what fails")
        if folder.exists():  # a corrupt earlier entry: replaced by the rename, then removed
            old = folder.parent / f".{name}.old-{os.getpid()}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    return folder


@contextlib.contextmanager
def _cache_lock(path: Path):
    """An exclusive lock on a cache entry (blocking: a second first use waits for the first one's training)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def train_and_save(name: str, folder: Path, progress: bool = True) -> dict:
    recipe = ZOO[name]
    trainer = train_llava if isinstance(recipe, LlavaRecipe) else train_clip
    start = time.perf_counter()
    with Progress(f"training {name}", total=recipe.steps, unit="steps", enabled=progress) as bar:
        model = trainer(recipe, on_step=lambda s, loss: bar.update(completed=s + 1, loss=loss))
    seconds = time.perf_counter() - start
    save_zoo_model(name, model, folder, seconds)
    return {"name": name, "seconds": round(seconds, 1), "folder": str(folder)}
