"""The common contract of ess-reg's reference mixers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ess_reg.operators import Operator


@dataclass
class MixerTrace:
    """What a mixer computed for one input.

    Attributes:
        operator: the exact causal operator(s), leading dims ``[B, C]``.
        u: ``[B, C, L, P]``, the sequence the operator acts on (values, or the channel input).
        y: ``[B, C, L, P]``, the mixer's inner output, taken from its normal forward path, so that
            ``operator.dense() @ u == y``.
    """

    operator: Operator
    u: torch.Tensor
    y: torch.Tensor


class SequenceMixer(nn.Module, ABC):
    """A token mixer ``[B, L, D] -> [B, L, D]`` whose core is a causal operator ``y = T u``.

    Subclasses split their forward into ``featurize`` (projections, gates, ``u``), ``mix`` (the
    efficient recurrent / chunked / FFT computation of the inner output) and ``readout`` (norms,
    gates, output projection), and say how to build the operator from the features. The forward
    never multiplies by a materialized ``T``.
    """

    #: Registry name (``MIXERS[name]``).
    name: ClassVar[str] = ""
    #: Whether :meth:`transition` is defined (a per-step state transition exists).
    has_transition: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self._capture_operator = False
        self._capture_transition = False
        self._capture_requests = 0  # hooks that asked for the next forward's operator
        self._capture_readers = 0  # hooks still to take this forward's operator
        self.captured_operator: Operator | None = None
        #: ``(u, y)`` of the forward that captured :attr:`captured_operator` (``T u == y``)
        self.captured_io: tuple[torch.Tensor, torch.Tensor] | None = None
        self.captured_transition: torch.Tensor | None = None

    # -- to implement ----------------------------------------------------------------------------
    @abstractmethod
    def featurize(self, x: torch.Tensor) -> dict[str, Any]:
        """Everything the mix and the operator need; must contain ``"u"``: ``[B, C, L, P]``."""

    @abstractmethod
    def mix(self, features: dict[str, Any]) -> torch.Tensor:
        """The inner output ``y: [B, C, L, P]`` by the mixer's own efficient computation."""

    @abstractmethod
    def build_operator(self, features: dict[str, Any]) -> Operator:
        """The operator ``T`` with leading dims ``[B, C]``."""

    @abstractmethod
    def readout(self, features: dict[str, Any], y: torch.Tensor) -> torch.Tensor:
        """Map the inner output back to ``[B, L, D]``."""

    @property
    @abstractmethod
    def state_size(self) -> int | None:
        """Theoretical state size per channel (or head); ``None`` when there is no finite state."""

    def transition_from_features(self, features: dict[str, Any]) -> torch.Tensor:
        """Diagonal of the per-step transition ``A_t``: ``[B, C, L, N]`` (or ``[B, C, L, 1]``)."""
        raise NotImplementedError(f"{type(self).__name__} has no state transition")

    # -- public API ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            _check_input(x, self)
            features = self.featurize(x)
            y = self.mix(features)
            if self._capture_operator:
                self._capture_operator = False
                self._capture_readers, self._capture_requests = self._capture_requests, 0
                self.captured_operator = self.build_operator(features)
                self.captured_io = (features["u"], y)
            if self._capture_transition:
                self._capture_transition = False
                self.captured_transition = self.transition_from_features(features)
            return self.readout(features, y)
        except BaseException:
            self._drop_capture()  # a failed forward leaves no request armed and no graph behind
            raise

    def _drop_capture(self) -> None:
        self._capture_operator = self._capture_transition = False
        self._capture_requests = self._capture_readers = 0
        self.captured_operator = self.captured_io = self.captured_transition = None

    def trace(self, x: torch.Tensor) -> MixerTrace:
        """The operator, its input ``u`` and the inner output ``y`` for ``x: [B, L, D]``."""
        _check_input(x, self)
        features = self.featurize(x)
        return MixerTrace(self.build_operator(features), features["u"], self.mix(features))

    def transition(self, x: torch.Tensor) -> torch.Tensor:
        """Diagonal of the state transition ``A_t`` at every step: ``[B, C, L, N]``.

        For the paper's ``||A - I||_F`` penalty. Raises ``NotImplementedError`` for mixers without a
        state (softmax attention, long convolutions).
        """
        _check_input(x, self)
        return self.transition_from_features(self.featurize(x))

    def request_capture(self, *, operator: bool = True, transition: bool = False) -> None:
        """Make the next forward keep its operator in :attr:`captured_operator` (and the diagonal of
        its transition in :attr:`captured_transition`). Each call counts one reader: the capture
        hooks take the operator off the module once every reader has it (:meth:`take_operator`), so
        nothing on the module holds an autograd graph after the forward's hooks have run."""
        # several hooks may ask before one forward (an ESS regularizer and a transition penalty):
        # a request adds to the others, never cancels them
        self._capture_operator = self._capture_operator or operator
        self._capture_requests += 1 if operator else 0
        self._capture_transition = self._capture_transition or (transition and self.has_transition)
        self.captured_operator = None
        self.captured_io = None
        self.captured_transition = None

    def take_operator(self) -> Operator | None:
        """The operator the last forward captured, for one of the readers that requested it; the
        module lets go of it when the last reader has taken it."""
        operator = self.captured_operator
        self._capture_readers = max(0, self._capture_readers - 1)
        if self._capture_readers == 0:
            self.captured_operator = self.captured_io = None
        return operator


def _check_input(x: torch.Tensor, mixer: nn.Module) -> None:
    d_model = getattr(mixer, "d_model", None)
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or (d_model and x.shape[-1] != d_model):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{type(mixer).__name__} expects x of shape [B, L, {d_model}], got {shape}")


class RealizationMixer(SequenceMixer):
    """A mixer whose features hold a diagonal realization: ``c``, ``b`` ``[B, C, L, N]`` and an
    optional ``log_decay`` (``[B, C, L, N]`` or ``[B, C, L, 1]``); the chunked scan is its mix."""

    has_transition = True

    def mix(self, features: dict[str, Any]) -> torch.Tensor:
        from ess_reg.mixers._kernels import diagonal_scan

        return diagonal_scan(features["c"], features["b"], features.get("log_decay"), features["u"])

    def build_operator(self, features: dict[str, Any]) -> Operator:
        from ess_reg.operators import DiagonalRealization

        return DiagonalRealization(features["c"], features["b"], features.get("log_decay"),
                                   validate=False)

    def transition_from_features(self, features: dict[str, Any]) -> torch.Tensor:
        log_decay = features.get("log_decay")
        return torch.ones_like(features["b"]) if log_decay is None else torch.exp(log_decay)
