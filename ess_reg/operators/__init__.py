"""Causal operators ``y = T u``: what a sequence mixer computes, one per channel or head."""

from __future__ import annotations

import torch

from ess_reg.operators.attention import SoftmaxAttentionOperator
from ess_reg.operators.base import NotCausalError, Operator
from ess_reg.operators.dense import DenseOperator
from ess_reg.operators.diagonal import DiagonalRealization

__all__ = ["DenseOperator", "DiagonalRealization", "NotCausalError", "Operator", "SoftmaxAttentionOperator",
           "as_operator"]


def as_operator(operator: Operator | torch.Tensor, name: str = "operator") -> Operator:
    """Return ``operator`` unchanged, or wrap a raw ``[..., C, L, L]`` tensor in a DenseOperator."""
    if isinstance(operator, Operator):
        return operator
    if isinstance(operator, torch.Tensor):
        return DenseOperator(operator)
    raise TypeError(
        f"{name} must be a DenseOperator, a DiagonalRealization or a [..., C, L, L] tensor, got "
        f"{type(operator).__name__}"
    )
