"""Accuracy measured inside `apply`: the recipe's `data.eval` before and after every stage, and the guards."""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import VlmCompressError

DUAL_ENCODERS = ("clip", "siglip")


class GuardError(VlmCompressError):
    """A stage lost more accuracy than the recipe's `guards` allow."""


def eval_rows(recipe, model: nn.Module) -> list[dict] | None:
    """Rows (`image`, `text`, and `shapes: True` for the built-in world) of the recipe's eval data, or None."""
    source = recipe.data.eval if recipe.data else None
    if source is None:
        return None
    from .data import load_rows

    if source.builtin == "shapes" and source.split == "train":
        source = source.model_copy(update={"split": "test"})  # never score on the training split's examples
    return load_rows(source, model, recipe.seed, source.size or 2000)


def measure(model: nn.Module, processor: Any, family: str, rows: list[dict] | None) -> dict[str, float] | None:
    """Retrieval recall (CLIP, SigLIP) or exact-match VQA accuracy (LLaVA, on data with questions) of `rows`; None
    where it cannot be measured (`not_measured` says why)."""
    if not_measured(family, rows, processor) is not None or rows is None:
        return None
    if family == "llava":
        from .evaluate import answer_questions

        answers = answer_questions(model, processor, [r["image"] for r in rows], [r["question"] for r in rows])
        return {"vqa_accuracy": round(sum(a == r["answer"] for a, r in zip(answers, rows)) / len(rows), 4)}
    from .evaluate import encode, evaluate_dual_encoder, recall_at_k

    if rows[0].get("shapes"):  # zero-shot shape classification is defined on the built-in world only
        result = evaluate_dual_encoder(model, processor, rows)
    else:
        img, txt = encode(model, processor, [r["image"] for r in rows], [r["text"] for r in rows])
        result = recall_at_k(img, txt, [r["text"] for r in rows])
    for k in (1, 5, 10):
        result[f"recall@{k}"] = round((result[f"i2t_R@{k}"] + result[f"t2i_R@{k}"]) / 2, 4)
    return {k: v for k, v in result.items() if isinstance(v, float)}


def not_measured(family: str, rows: list[dict] | None, processor: Any) -> str | None:
    """Why `apply` cannot measure accuracy on the recipe's `data.eval` (one line), or None when it can (or when the
    recipe has no `data.eval`: nothing was asked)."""
    if rows is None:
        return None
    if processor is None or (family == "llava" and not hasattr(processor, "tokenizer")):
        return "accuracy not measured: the model has no saved processor to build its inputs with"
    if family in DUAL_ENCODERS:
        return None
    if family == "llava":
        if rows and "question" in rows[0] and "answer" in rows[0]:
            return None
        return ("accuracy not measured: LLaVA is measured by exact-match VQA, and data.eval has no question / answer "
                "columns (name them with question_column / answer_column, or use data.eval: {builtin: shapes, split: "
                "test})")
    return (f"accuracy not measured: apply measures retrieval (CLIP, SigLIP) and VQA (LLaVA), not yet {family}; "
            "use vlmcompress eval")


def check_guards(guards, before: dict[str, float] | None, after: dict[str, float] | None, stage: str) -> None:
    if guards is None or not guards.max_drop:
        return
    if before is None or after is None:
        raise GuardError("the recipe sets guards but no accuracy could be measured: add data.eval (e.g. "
                         "{builtin: shapes, split: test, size: 2000}) and use a model with a saved processor")
    for metric, limit in guards.max_drop.items():
        if metric not in before:
            raise GuardError(f"guards.max_drop: unknown metric '{metric}'; expected one of: {', '.join(before)}")
        drop = (before[metric] - after[metric]) * 100
        if drop > limit:
            raise GuardError(
                f"guard exceeded after stage {stage}: {metric} fell {drop:.2f} points "
                f"({before[metric]:.4f} → {after[metric]:.4f}), the recipe allows {limit}; the stage results are "
                "kept in the working folder next to the output for inspection, no output was written"
            )
