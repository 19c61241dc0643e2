"""Distillation losses shared by the training stages (pure functions of logits; the task losses live with their
family in `adapters/`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) ‖ softmax(student / T)) · T², averaged over rows (Hinton et al.'s soft targets).

    Args:
        student, teacher: `[N, C]` logits (rows are distributions over C classes / candidates / tokens).
    Returns:
        A scalar, 0 exactly when the rows' softmaxes agree, positive otherwise; the T² keeps its gradient scale
        independent of the temperature.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def logit_distillation(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                       temperature: float) -> torch.Tensor:
    """The mean of `kl_rows` over the named logits both models produced (a family's similarity rows, its ITM head,
    its answer tokens)."""
    names = [k for k in student if k in teacher]
    if not names:
        raise ValueError("the student and the teacher share no logits to distil")
    return sum(kl_rows(student[k], teacher[k], temperature) for k in names) / len(names)


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor], mapping: list[int]) -> torch.Tensor:
    """Mean over the student's hidden states of MSE(student[i], teacher[mapping[i]]).

    Args:
        student: `L_s + 1` tensors `[B, N, D]` (the embeddings' output, then each layer's output).
        teacher: `L_t + 1` tensors of the same shapes. mapping: a teacher index per student index.
    """
    if len(mapping) != len(student):
        raise ValueError(f"{len(student)} student hidden states but a layer map of {len(mapping)}")
    return sum(F.mse_loss(s.float(), teacher[t].float()) for s, t in zip(student, mapping)) / len(student)


def attention_mse(student: list[torch.Tensor], teacher: list[torch.Tensor], mapping: list[int]) -> torch.Tensor:
    """Mean over the student's layers of MSE between attention maps `[B, heads, N, N]` (probabilities)."""
    if len(mapping) != len(student):
        raise ValueError(f"{len(student)} student attention maps but a layer map of {len(mapping)}")
    return sum(F.mse_loss(s.float(), teacher[t].float()) for s, t in zip(student, mapping)) / len(student)


def embedding_distance(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the named embeddings of ‖ŝ − t̂‖² per row, averaged over rows, where ŝ, t̂ are the unit-length
    student and teacher embeddings `[N, D]` (CLIP-KD's feature distillation: it pulls the student's embedding
    space onto the teacher's directly, where the similarity KL only constrains it through the batch's rows).

    Equal to 2 − 2·cos(s, t): 0 exactly when every row points the same way, at most 4.
    """
    names = [k for k in student if k in teacher]
    if not names:
        raise ValueError("the student and the teacher share no embeddings to distil")
    total = 0.0
    for k in names:
        if student[k].shape != teacher[k].shape:
            raise ValueError(f"student {k} embeddings {tuple(student[k].shape)} and teacher's "
                             f"{tuple(teacher[k].shape)} differ")
        s = F.normalize(student[k].float(), dim=-1)
        t = F.normalize(teacher[k].float(), dim=-1)
        total = total + (s - t).pow(2).sum(dim=-1).mean()
    return total / len(names)
