"""``DenseOperator``: an explicit lower-triangular ``L x L`` matrix per channel."""

from __future__ import annotations

from typing import Any

import torch

from ess_reg.operators._checks import (
    require_finite,
    require_rank,
    require_seq_len,
    require_tensor,
)
from ess_reg.operators.base import NotCausalError, Operator

#: Upper-triangular entries up to this fraction of ``max |T|`` are treated as rounding noise.
CAUSAL_RTOL = 1e-6


class DenseOperator(Operator):
    """A causal operator given as a matrix, for layers without a small state.

    Use it for softmax attention, explicit long convolutions, or anything else whose ``T`` is
    known only entry by entry.

    Args:
        matrix: ``[..., C, L, L]`` (batch optional), lower-triangular: ``matrix[..., i, j]`` is the
            weight of input ``j`` in output ``i``. Entries above the diagonal must be zero (up to
            ``CAUSAL_RTOL * max|T|``; they are then set to exactly zero).
        validate: check shape, finiteness and causality (one host sync). Turn off only for
            tensors already validated.
    """

    def __init__(self, matrix: torch.Tensor, *, validate: bool = True) -> None:
        require_tensor(matrix, "matrix")
        if matrix.is_complex():
            raise TypeError(
                "matrix must be real; a layer with real outputs has a real operator, so pass "
                "matrix.real (complex state-space layers belong in DiagonalRealization)"
            )
        if validate:
            require_rank(matrix, "matrix", "[batch, C, L, L]")
            if matrix.shape[-1] != matrix.shape[-2]:
                raise ValueError(
                    f"matrix must be square in its last two dims [..., C, L, L], got "
                    f"{tuple(matrix.shape)}; the operator maps L inputs to L outputs"
                )
            require_seq_len(matrix.shape[-1], "matrix")
            require_finite(matrix, "matrix")
            _require_causal(matrix)
        self._matrix = matrix.tril()

    @classmethod
    def _triangular(cls, matrix: torch.Tensor) -> DenseOperator:
        """An operator over ``matrix`` that is already exactly lower-triangular (a tensor of another
        operator, a subset of its channels, its copy on another device): no check, no ``tril``,
        which on a ``[B, H, L, L]`` attention matrix would cost a pass over it and its backward."""
        op = cls.__new__(cls)
        op._matrix = matrix
        return op

    def rebuild(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> DenseOperator:
        """The operator over a replacement matrix, which must be lower-triangular like this one's
        (not checked: rebuilds run in every regularized step)."""
        return DenseOperator._triangular(tensors[0])

    @property
    def matrix(self) -> torch.Tensor:
        """The lower-triangular matrix ``[..., C, L, L]``."""
        return self._matrix

    @property
    def shape(self) -> torch.Size:
        return self._matrix.shape[:-2]

    @property
    def seq_len(self) -> int:
        return self._matrix.shape[-1]

    @property
    def state_size(self) -> int | None:
        return None

    @property
    def dtype(self) -> torch.dtype:
        return self._matrix.dtype

    @property
    def device(self) -> torch.device:
        return self._matrix.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self._matrix,)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._matrix if dtype is None else self._matrix.to(dtype)

    def to(self, *args: Any, **kwargs: Any) -> DenseOperator:
        return DenseOperator._triangular(self._matrix.to(*args, **kwargs))


def _require_causal(matrix: torch.Tensor) -> None:
    if matrix.numel() == 0:  # no channel (or an empty batch): nothing to check
        return
    upper = matrix.detach().triu(1).abs()
    worst = upper.max()
    scale = matrix.detach().abs().max()
    if bool(worst > CAUSAL_RTOL * scale):
        flat = int(upper.reshape(-1).argmax())
        index = tuple(int(k) for k in torch.unravel_index(torch.tensor(flat), upper.shape))
        raise NotCausalError(
            f"matrix is not causal: its largest entry above the diagonal is {float(worst):.3g} at "
            f"index {index} (row i < column j means output i depends on a later input j); "
            "mask the future before building the operator, e.g. matrix.tril()"
        )
