"""The common interface of causal operators ``y = T u``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class NotCausalError(ValueError):
    """A layer computes a non-causal (bidirectional) operator, which has no effective state size.

    Extractors raise it for such a call; the capture hooks then leave the layer out with a warning
    naming it instead of measuring an operator the layer does not compute."""


class Operator(ABC):
    """A causal linear operator per channel (or head), ``y[..., c, :] = T[..., c] @ u[..., c, :]``.

    Leading dims are ``[batch, channel]``; the batch dim may be absent. Subclasses say how ``T`` is
    stored: :class:`~ess_reg.operators.DenseOperator` keeps the ``L x L`` matrix,
    :class:`~ess_reg.operators.DiagonalRealization` keeps a state-space realization.
    """

    @property
    @abstractmethod
    def shape(self) -> torch.Size:
        """Leading dims ``[..., C]`` (batch optional, channel last)."""

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Sequence length ``L``."""

    @property
    @abstractmethod
    def state_size(self) -> int | None:
        """Theoretical state size per channel (TSS); ``None`` when there is no finite state."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Real dtype of the materialized operator."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device the operator's tensors live on."""

    @abstractmethod
    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Materialize ``T`` as a lower-triangular ``[..., C, L, L]`` tensor in ``dtype``."""

    def scaled_dense(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``T`` up to a power of two per channel: ``(T', e)`` with ``T = T' * 2^e``, ``T'``
        ``[..., C, L, L]`` in ``dtype`` with a largest entry in ``[1, 2)`` (or all zero), ``e``
        ``[..., C]`` float and detached.

        ESS does not depend on a channel's scale, so the dense route uses this form; realizations
        override it to materialize without ever forming the unscaled products.
        """
        from ess_reg.functional._scaling import normalize_channels

        matrix = self.dense(dtype)
        return normalize_channels(matrix, (-2, -1))

    @abstractmethod
    def to(self, *args: Any, **kwargs: Any) -> Operator:
        """Move or cast like :meth:`torch.Tensor.to`; returns a new operator."""

    @property
    def num_channels(self) -> int:
        """Number of channels (or heads) ``C``."""
        return self.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        """Leading dims before the channel dim (empty when there is no batch)."""
        return self.shape[:-1]

    @property
    def requires_grad(self) -> bool:
        """Whether any of the operator's tensors is attached to an autograd graph."""
        return any(t.requires_grad for t in self.tensors())

    @abstractmethod
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors that define the operator (for hooks, device checks and autograd)."""

    def rebuild(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Operator:
        """The same operator over replacement ``tensors`` (in :meth:`tensors` order, same shapes).

        The regularizer's backward-pass mode rebuilds each captured operator over detached leaves;
        a custom operator type implements this to take part.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement Operator.rebuild(tensors), which the "
            "backward-pass mode (ESSRegularizer.attach, ESSOptimizer) needs"
        )

    def __repr__(self) -> str:
        state = "none" if self.state_size is None else str(self.state_size)
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, seq_len={self.seq_len}, "
            f"state_size={state}, dtype={self.dtype}, device={self.device})"
        )
