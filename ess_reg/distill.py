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

    Returns a scalar in at least float32 (half-precision logits are computed and returned in
    float32, where the loss cannot overflow); 0 when no position counts. A teacher logit of ``-inf``
    (a token it rules out) contributes nothing; positions that do not count may hold anything,
    NaN included.
    """
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise TypeError("student_logits and teacher_logits must be tensors [..., V]")
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise TypeError(f"student_logits and teacher_logits must be floating point, got "
                        f"{student_logits.dtype} and {teacher_logits.dtype}")
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
    if targets is None:
        scored = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    else:
        scored = (targets != ignore_index).to(student_logits.device)
    keep = scored[..., None]  # unscored positions never enter, whatever they hold (NaN included)
    student = torch.where(keep, student_logits.to(dtype), 0)
    teacher = torch.where(keep, teacher_logits.detach().to(dtype), 0)
    student = F.log_softmax(student / temperature, dim=-1)
    teacher = F.log_softmax(teacher / temperature, dim=-1)
    probability = teacher.exp()
    terms = torch.where(probability > 0, probability * (teacher - student), 0)  # 0 log 0 = 0
    loss = terms.sum() / scored.sum().clamp_min(1).to(dtype)
    return loss * temperature ** 2
