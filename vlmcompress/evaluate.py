"""Accuracy on image-text data: recall@K both ways and zero-shot classification for dual encoders.

Protocol (shapes test split by default): 5 folds of 1,000 image-caption pairs (5,000 test pairs); within a fold every
image ranks the fold's 1,000 captions and every caption ranks the fold's 1,000 images; a hit is a retrieved caption
(image) whose caption string equals the ground truth, so duplicate captions count as hits. Baselines next to every
number: chance (random ranking, computed exactly with the duplicates) and majority (always the fold's most frequent
caption). Zero-shot: on single-object images, the candidates are the true caption with the shape word replaced by each
of the six shapes.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adapters.base import pooled
from .data import shapes
from .errors import VlmCompressError

KS = (1, 5, 10)


@torch.no_grad()
def encode(model: nn.Module, processor: Any, images: list, texts: list[str], batch_size: int = 250):
    """L2-normalised `([N, D] image, [M, D] text)` embeddings of a dual encoder."""
    img, txt = [], []
    for i in range(0, len(images), batch_size):
        pixels = processor.image_processor(images=images[i:i + batch_size], return_tensors="pt")["pixel_values"]
        img.append(pooled(model.get_image_features(pixel_values=pixels.to(model.dtype))))
    for i in range(0, len(texts), batch_size):
        batch = processor.tokenizer(texts[i:i + batch_size], padding=True, return_tensors="pt")
        txt.append(pooled(model.get_text_features(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"])))
    return F.normalize(torch.cat(img).float(), dim=-1), F.normalize(torch.cat(txt).float(), dim=-1)


def _chance_recall(matches: int, n: int, k: int) -> float:
    """P(at least one of `matches` relevant items among k drawn without replacement from n)."""
    return 1.0 - math.comb(n - matches, k) / math.comb(n, k)


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str], fold_size: int = 1000,
                ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Image→text and text→image recall@K averaged over folds, with chance and majority baselines.

    The first `n // fold_size` whole folds are scored (every fold has the same candidate count, so recall values are
    comparable); the rows beyond them are left out and counted in `pairs_left_out`.
    """
    n = len(captions)
    if n < fold_size:
        fold_size = n
    folds = n // fold_size
    sums: Counter = Counter()
    for f in range(folds):
        lo, hi = f * fold_size, (f + 1) * fold_size
        caps = captions[lo:hi]
        ids = {c: i for i, c in enumerate(dict.fromkeys(caps))}
        label = torch.tensor([ids[c] for c in caps])
        relevant = label[:, None] == label[None, :]  # [fold, fold] same caption
        sim = image_emb[lo:hi] @ text_emb[lo:hi].t()
        counts = Counter(caps)
        top = counts.most_common(1)[0][1]
        for k in ks:
            i2t = relevant.gather(1, sim.topk(k, dim=1).indices).any(dim=1).float().mean().item()
            t2i = relevant.gather(1, sim.t().topk(k, dim=1).indices).any(dim=1).float().mean().item()
            sums[f"i2t_R@{k}"] += i2t
            sums[f"t2i_R@{k}"] += t2i
            sums[f"chance_R@{k}"] += float(np.mean([_chance_recall(counts[c], len(caps), k) for c in caps]))
        sums["majority_R@1"] += top / len(caps)
    return {k: round(v / folds, 4) for k, v in sums.items()} | {"folds": folds, "fold_size": fold_size,
                                                             "pairs_left_out": n - folds * fold_size}


@torch.no_grad()
def zero_shot_shape(model: nn.Module, processor: Any, rows: list[dict]) -> dict[str, float]:
    """Accuracy of picking the right shape word among the six, on single-object images."""
    single = [r for r in rows if r["text"].count(" and ") == 0]
    if not single:
        return {"zero_shot_shape": float("nan"), "zero_shot_chance": 1 / len(shapes.SHAPES), "zero_shot_n": 0}
    texts = []
    for r in single:
        true = next(s for s in shapes.SHAPES if f" {s} " in f" {r['text']} ")
        texts += [r["text"].replace(f" {true} ", f" {s} ") for s in shapes.SHAPES]
    img, txt = encode(model, processor, [r["image"] for r in single], texts)
    scores = (img[:, None, :] * txt.view(len(single), len(shapes.SHAPES), -1)).sum(-1)
    truth = torch.tensor([next(i for i, s in enumerate(shapes.SHAPES) if f" {s} " in f" {r['text']} ")
                          for r in single])
    acc = (scores.argmax(dim=1) == truth).float().mean().item()
    return {"zero_shot_shape": round(acc, 4), "zero_shot_chance": round(1 / len(shapes.SHAPES), 4),
            "zero_shot_n": len(single)}


def shapes_eval_rows(model: nn.Module, size: int = 5000, seed: int = 0) -> list[dict]:
    image_size = model.config.vision_config.image_size
    return shapes.generate("test", size, seed=seed, config=shapes.ShapesConfig(image_size=image_size))


def evaluate_dual_encoder(model: nn.Module, processor: Any, rows: list[dict] | None = None,
                          size: int = 5000) -> dict[str, Any]:
    """Recall@1/5/10 both ways, zero-shot shape accuracy and baselines for a CLIP / SigLIP model."""
    if processor is None or not hasattr(processor, "tokenizer"):
        raise VlmCompressError("this model has no saved processor (tokenizer + image processor); evaluation needs "
                               "one: save it next to the weights with processor.save_pretrained(folder)")
    rows = rows if rows is not None else shapes_eval_rows(model, size)
    img, txt = encode(model, processor, [r["image"] for r in rows], [r["text"] for r in rows])
    return recall_at_k(img, txt, [r["text"] for r in rows]) | zero_shot_shape(model, processor, rows)


VQA_PROMPT = shapes.VQA_PROMPT  # the built-in teacher's; a processor with a chat template builds its own
vqa_prompts = shapes.vqa_prompts


@torch.no_grad()
def answer_questions(model: nn.Module, processor: Any, images: list, questions: list[str], batch_size: int = 100,
                     max_new_tokens: int = 3) -> list[str]:
    """Greedy short answers of a generative VLM, prompts built by its saved processor (left padding)."""
    answers: list[str] = []
    for i in range(0, len(images), batch_size):
        prompts = vqa_prompts(processor, questions[i:i + batch_size])
        batch = processor(text=prompts, images=list(images[i:i + batch_size]), padding=True, return_tensors="pt")
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    return answers


def evaluate_vqa(model: nn.Module, processor: Any, rows: list[dict] | None = None, size: int = 2000) -> dict[str, Any]:
    """Exact-match VQA accuracy on shapes questions, per question type, with chance, majority-answer and no-image
    (the same questions asked about a blank grey image) baselines."""
    if processor is None or not hasattr(processor, "tokenizer"):
        raise VlmCompressError("this model has no saved processor; VQA evaluation builds prompts with it")
    rows = rows if rows is not None else shapes_eval_rows(model, size)
    questions = [r["question"] for r in rows]
    predicted = answer_questions(model, processor, [r["image"] for r in rows], questions)
    blank = np.full_like(rows[0]["image"], 128)
    blind = answer_questions(model, processor, [blank] * len(rows), questions)
    train = shapes.generate("train", 5000, seed=1, config=shapes.ShapesConfig(image_size=rows[0]["image"].shape[0]))
    by_type: dict[str, Counter] = {}
    for r in train:
        by_type.setdefault(r["qtype"], Counter())[r["answer"]] += 1
    majority = [by_type[r["qtype"]].most_common(1)[0][0] for r in rows]
    result: dict[str, Any] = {
        "vqa_accuracy": _match(predicted, rows), "no_image_accuracy": _match(blind, rows),
        "majority_accuracy": _match(majority, rows),
        "chance_accuracy": round(float(np.mean([1 / len(by_type[r["qtype"]]) for r in rows])), 4), "n": len(rows)}
    for kind in shapes.QUESTION_TYPES:
        idx = [i for i, r in enumerate(rows) if r["qtype"] == kind]
        if idx:
            result[f"vqa_{kind}"] = _match([predicted[i] for i in idx], [rows[i] for i in idx])
    return result


def _match(predicted: list[str], rows: list[dict]) -> float:
    return round(sum(p == r["answer"] for p, r in zip(predicted, rows)) / max(len(rows), 1), 4)
