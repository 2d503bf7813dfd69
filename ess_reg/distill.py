"""Knowledge distillation on logits: the loss a student minimises to copy its teacher, and a small
loop that trains a student on it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["distill_student", "distillation_loss"]


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


def distill_student(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    temperature: float = 2.0,
    weight: float = 1.0,
    ignore_index: int = -100,
    max_grad_norm: float | None = 1.0,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Train ``student`` to copy ``teacher``: one optimizer step per batch of ``batches``.

    Each batch is ``inputs`` or ``(inputs, targets)`` (``[B, L]`` token ids and labels, on the
    student's device; ``targets[b, t]`` is the label of ``logits[b, t]``, ``ignore_index`` at unscored
    positions: shift a causal LM's labels first, and turn dict batches into pairs, e.g.
    ``((b["input_ids"], b["labels"]) for b in loader)``). The teacher runs
    frozen in eval mode without gradients; the loss is ``weight * distillation_loss(...)`` plus
    ``(1 - weight)`` times the cross-entropy on ``targets`` when ``weight < 1``, plus ``penalty()``
    when given (e.g. an :class:`ess_reg.ESSRegularizer` in loss-term mode, to keep the student's
    memory small). Models may return logits ``[B, L, V]`` or an output with ``.logits`` (transformers).

    Returns ``[steps]`` the loss of each step, detached and left on the device (no host
    synchronisation inside the loop).
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("student and teacher must be torch.nn.Module instances")
    if student is teacher:
        raise ValueError("student and teacher must be different modules (copy the teacher first)")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise ValueError(f"weight must be a number in [0, 1] (the distillation term's share), got {weight!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be None or a number > 0, got {max_grad_norm!r}")
    was_training = teacher.training
    teacher.eval()
    student.train()
    losses: list[torch.Tensor] = []
    try:
        for index, batch in enumerate(batches):
            inputs, targets = _unpack(batch, index)
            if weight < 1 and targets is None:
                raise ValueError(f"batch {index} has no targets, which weight={weight} < 1 needs "
                                 "(its cross-entropy term); yield (inputs, targets)")
            with torch.no_grad():
                teacher_logits = _logits(teacher(inputs))
            logits = _logits(student(inputs))
            loss = weight * distillation_loss(logits, teacher_logits, targets, temperature=temperature,
                                              ignore_index=ignore_index)
            if weight < 1:
                task = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten().to(logits.device),
                                       ignore_index=ignore_index)
                loss = loss + (1 - weight) * task
            if penalty is not None:
                loss = loss + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
            optimizer.step()
            losses.append(loss.detach())
    finally:
        teacher.train(was_training)
    if not losses:
        return torch.zeros(0)
    return torch.stack(losses)


def _unpack(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    pair = isinstance(batch, (tuple, list)) and len(batch) == 2
    if pair and all(isinstance(t, torch.Tensor) for t in batch):
        return batch[0], batch[1]
    raise TypeError(f"batch {index} must be an inputs tensor or an (inputs, targets) pair of tensors, "
                    f"got {type(batch).__name__} (for dict batches pass ((b['input_ids'], b['labels']) "
                    "for b in loader) with labels aligned to the logits)")


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}; distill_student needs logits [B, L, V] "
                        "or an output with .logits")
    return logits
