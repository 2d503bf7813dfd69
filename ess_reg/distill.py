"""Knowledge distillation on logits: the loss a student minimises to copy its teacher."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    r"""Mean KL divergence ``KL(teacher || student)`` of the temperature-softened distributions,
    times ``temperature**2`` (Hinton et al.'s scaling, so the gradient's size does not depend on the
    temperature).

    Args:
        student_logits: ``[..., V]``; gradients flow into it.
        teacher_logits: ``[..., V]`` of the same shape; treated as a constant (detached).
        targets: optional ``[...]`` labels: only positions whose label is not ``ignore_index`` count
            (e.g. the query positions of MQAR, where the teacher's prediction carries the memory);
            without it every position counts.
        temperature: > 0; 1 matches the raw distributions, larger values weigh the teacher's ranking
            of the wrong tokens more.
        ignore_index: the label of unscored positions.

    Returns a scalar in the logits' dtype (computed in at least float32); 0 when no position counts.
    """
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise TypeError("student_logits and teacher_logits must be tensors [..., V]")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 1:
        raise ValueError(f"student_logits and teacher_logits must have the same shape [..., V], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if targets is not None and tuple(targets.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"targets must have the logits' shape without the last axis "
                         f"{tuple(student_logits.shape[:-1])}, got {tuple(targets.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)  # [...]
    if targets is None:
        loss = per_position.mean()
    else:
        scored = (targets != ignore_index).to(dtype)
        loss = (per_position * scored).sum() / scored.sum().clamp_min(1)
    return (loss * temperature ** 2).to(student_logits.dtype)
