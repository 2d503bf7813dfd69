"""``SoftmaxAttentionOperator``: causal softmax attention, formed from its queries and keys on demand."""

from __future__ import annotations

import math
from typing import Any

import torch

from ess_reg.operators._checks import require_seq_len, require_tensor
from ess_reg.operators.dense import DenseOperator


class SoftmaxAttentionOperator(DenseOperator):
    r"""``T = softmax(q k^T / sqrt(d) + causal mask)`` per head, kept as ``q`` and ``k``.

    A dense operator (no finite state) whose matrix is formed only when something asks for it, and
    only for the heads it is asked about: a model that never materializes its attention matrix
    (flash or memory-efficient attention) pays for the heads the regularizer samples, not for all
    ``B x H`` of them, and keeps no ``[B, H, L, L]`` tensor alive between forward and backward.

    Args:
        q, k: ``[..., H, L, d]`` real floating-point queries and keys of the same shape and dtype
            (batch optional). The matrix is formed in at least float32 (as autocast computes a
            softmax), with ``q`` scaled before the product, so half-precision scores do not overflow.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor) -> None:
        require_tensor(q, "q")
        require_tensor(k, "k")
        if q.shape != k.shape or q.dim() < 3:
            raise ValueError(f"q and k must have the same shape [..., H, L, d], got {tuple(q.shape)} and "
                             f"{tuple(k.shape)}")
        require_seq_len(q.shape[-2], "q")
        if q.dtype != k.dtype or not q.is_floating_point():
            raise TypeError(f"q and k must be real floating point of one dtype, got {q.dtype} and {k.dtype}")
        if q.shape[-1] < 1:
            raise ValueError("q and k need a head dimension d >= 1, got 0")
        self._q, self._k = q, k

    @property
    def matrix(self) -> torch.Tensor:
        """The lower-triangular attention matrix ``[..., H, L, L]`` (formed on each access)."""
        return self.dense()

    @property
    def shape(self) -> torch.Size:
        return self._q.shape[:-2]

    @property
    def seq_len(self) -> int:
        return self._q.shape[-2]

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self._q.dtype, torch.float32)

    @property
    def device(self) -> torch.device:
        return self._q.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self._q, self._k)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        wide = self.dtype
        q, k = self._q.to(wide), self._k.to(wide)
        scores = (q / math.sqrt(q.shape[-1])) @ k.mT
        length = q.shape[-2]
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        matrix = torch.softmax(scores.masked_fill(~causal, -torch.inf), dim=-1)  # exactly triangular
        return matrix if dtype is None else matrix.to(dtype)

    def rebuild(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> SoftmaxAttentionOperator:
        return SoftmaxAttentionOperator(tensors[0], tensors[1])

    def to(self, *args: Any, **kwargs: Any) -> SoftmaxAttentionOperator:
        return SoftmaxAttentionOperator(self._q.to(*args, **kwargs), self._k.to(*args, **kwargs))
