"""What a user can ask an ``ESSRegularizer`` for: targets, weight schedules, per-layer values and
per-batch splits, each turned into one small callable here."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

#: ``"max"``, ``"min"``, a float (squared distance) or ``("at_least", u)`` (a floor).
Target = Literal["max", "min"] | float | tuple[str, float]
#: A value for every layer, a dict by module name (missing layers: none) or ``f(name) -> value``.
PerLayer = Any
Schedule = Literal["constant", "linear_decay", "cosine_decay"] | Callable[[int], float]
#: ``f(first_model_input) -> [B, S]`` (or ``[S]``) split indices for that batch.
SplitFn = Callable[[Any], torch.Tensor]
_SCHEDULES = ("constant", "linear_decay", "cosine_decay")


def check_target(target: Any, where: str = "target") -> None:
    """Raise a ValueError naming ``where`` unless ``target`` is a valid target."""
    if isinstance(target, str) and target in ("max", "min"):
        return
    number = as_number(target)
    if number is not None and math.isfinite(number):
        return
    if isinstance(target, tuple | list) and len(target) == 2 and target[0] == "at_least":
        floor = as_number(target[1])
        if floor is not None and math.isfinite(floor) and floor >= 0:
            return
    raise ValueError(f"{where} must be 'max', 'min', a finite number or ('at_least', u) with a finite "
                     f"u >= 0, got {target!r}")


def target_term(target: Target, value: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``f(v)`` of one layer: ``1 - v`` (``-v`` unnormalized) for ``"max"``, ``v`` for ``"min"``,
    ``(v - t)^2`` for a float ``t``, ``relu(u - v)`` for ``("at_least", u)``."""
    if isinstance(target, str) and target == "max":
        return (1 - value) if normalize else -value
    if isinstance(target, str) and target == "min":
        return value
    if isinstance(target, tuple | list):
        return torch.relu(as_number(target[1]) - value)
    return (value - as_number(target)) ** 2


def per_layer(value: PerLayer, names: Sequence[str], what: str, check: Callable[[Any, str], None],
              default: Any) -> dict[str, Any]:
    """Resolve a per-layer option for the layers ``names``: one value for all, a dict by module
    name (names missing from it get ``default``; unknown names are an error) or ``f(name)``."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{what} names layers that are not regularized mixers: {unknown}; "
                             f"the mixers are {list(names)}")
        out = {name: value.get(name, default) for name in names}
    elif callable(value) and not isinstance(value, str | tuple | list):
        out = {name: value(name) for name in names}
    else:
        out = dict.fromkeys(names, value)
    for name, item in out.items():
        check(item, f"{what}[{name!r}]" if not _is_scalar_option(value) else what)
    return out


def _is_scalar_option(value: Any) -> bool:
    return not (isinstance(value, Mapping) or (callable(value) and not isinstance(value, str)))


def as_number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (Python, NumPy or a one-element tensor), else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.is_meta:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_weight(weight: Any, where: str = "weight") -> None:
    number = as_number(weight)
    if number is None or not math.isfinite(number):
        raise ValueError(f"{where} must be a finite number, got {weight!r}")


def schedule_factor(schedule: Schedule, total_steps: int | None) -> Callable[[int], float]:
    """``step -> factor`` multiplying the weight: constant 1, a linear or cosine decay from 1 at
    step 0 to 0 at ``total_steps`` (then 0), or the user's callable."""
    if callable(schedule) and not isinstance(schedule, str):
        return schedule
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES} or a callable step -> factor, "
                         f"got {schedule!r}")
    if schedule == "constant":
        return _constant
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"schedule={schedule!r} needs total_steps, an int >= 1, got {total_steps!r}")
    return _LinearDecay(total_steps) if schedule == "linear_decay" else _CosineDecay(total_steps)


def _constant(step: int) -> float:
    return 1.0


class _LinearDecay:
    def __init__(self, total: int) -> None:
        self.total = total

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.total)


class _CosineDecay:
    def __init__(self, total: int) -> None:
        self.total = total

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))


def check_factor(factor: Any, step: int) -> float:
    number = as_number(factor)
    if number is None or not (math.isfinite(number) and number >= 0):
        raise ValueError(f"the schedule returned {factor!r} at step {step}; it must return a finite "
                         "number >= 0")
    return number


def batch_splits(index: Any, seq_len: int, where: str = "splits") -> torch.Tensor:
    """Validate per-batch split indices: a ``[B, S]`` (or ``[S]``) integer tensor in ``1 .. L-1``."""
    if index is None:
        raise ValueError(f"{where} gave None; a splits callable must return a [B, S] (or [S]) index tensor")
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index)
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"{where} must give integer split indices, got dtype {index.dtype}")
    if index.dim() not in (1, 2) or index.numel() == 0:
        raise ValueError(f"{where} must give a [B, S] (or [S]) index tensor with S >= 1, got shape "
                         f"{tuple(index.shape)}")
    low, high = int(index.min()), int(index.max())
    if low < 1 or high > seq_len - 1:
        raise ValueError(f"{where} gave split indices from {low} to {high}; they must lie in "
                         f"1 .. L-1 = 1 .. {seq_len - 1}")
    return index.long()


def batch_mean(ess: torch.Tensor, index: torch.Tensor, union: torch.Tensor, batched: bool) -> torch.Tensor:
    """Mean of ``ess`` ``[B, C, U]`` (``[C, U]`` when not ``batched``; one value per split of
    ``union``) over each example's own splits ``index`` ``[B, S]`` (or ``[S]`` for all), channels and
    batch. An operator without a batch dimension is shared by every example."""
    counts = (index.reshape(-1, index.shape[-1], 1) == union.to(index.device)).sum(-2)  # [B or 1, U]
    counts = counts.to(ess.device, ess.dtype)
    if index.dim() == 1 or not batched:
        weights = counts.sum(0)  # every example's splits, on the same operator(s)
        return (ess * weights).sum() / (weights.sum() * ess[..., 0].numel())
    batch = index.shape[0]
    if ess.shape[0] != batch:
        raise ValueError(f"splits gave one row per example for a batch of {batch}, but the operator's "
                         f"leading dimension is {ess.shape[0]}")
    flat = ess.reshape(batch, -1, ess.shape[-1])  # [B, C, U]
    return (flat * counts[:, None, :]).sum() / (counts.sum() * flat.shape[1])


def sampled_batch_mean(ess: torch.Tensor, index: torch.Tensor, union: torch.Tensor,
                       batch_index: torch.Tensor, batch: int) -> torch.Tensor:
    """:func:`batch_mean` over a random subset of a batched layer's operators: ``ess`` ``[K, U]``,
    row ``k`` from batch element ``batch_index[k]`` of the layer's ``batch``, each measured at its
    own example's splits ``index`` ``[B, S]`` (or ``[S]`` for all). Every example has ``S``
    splits, so this is an unbiased estimate of the full mean."""
    counts = (index.reshape(-1, index.shape[-1], 1) == union.to(index.device)).sum(-2)  # [B or 1, U]
    counts = counts.to(ess.device, ess.dtype)
    if index.dim() == 1:
        return (ess * counts[0]).sum() / (counts[0].sum() * ess.shape[0])
    if index.shape[0] != batch:
        raise ValueError(f"splits gave one row per example for a batch of {index.shape[0]}, but the "
                         f"operator's leading dimension is {batch}")
    weights = counts[batch_index.to(counts.device)]
    return (ess * weights).sum() / weights.sum()
