"""What the Lightning and Hugging Face integrations log: ESS of a probe batch and the penalty."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ess_reg.capture import capture_operators
from ess_reg.metric import ESSMetric


def log_key(prefix: str, key: str) -> str:
    """``prefix + key`` without repeating the prefix: ``ess/`` + ``ess/total`` -> ``ess/total``,
    ``ess/`` + ``blocks.0.mixer/ess`` -> ``ess/blocks.0.mixer/ess``."""
    stem = prefix.rstrip("/")
    if stem and key.startswith(stem + "/"):
        key = key[len(stem) + 1:]
    return prefix + key


def measure_ess(model: nn.Module, inputs: Any, prefix: str,
                metric_kwargs: Mapping[str, Any]) -> dict[str, float]:
    """Scalar ESS statistics of every recognised layer on ``inputs`` (eval mode, no gradients):
    ``{prefix}{layer}/{stat}`` plus ``{prefix}total`` and ``{prefix}mean_utilization``."""
    metric = ESSMetric(**metric_kwargs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                operators = capture_operators(model, **inputs)
            else:
                operators = capture_operators(model, inputs)
    finally:
        model.train(was_training)
    metric.update(operators)
    return {log_key(prefix, k): float(v) for k, v in metric.compute().items() if v.dim() == 0}


def penalty_value(regularizer: Any) -> float | None:
    """The last completed step's penalty of an ``ESSRegularizer`` as a float, if there is one."""
    last = getattr(regularizer, "last_penalty", None)
    return None if last is None else float(last)
