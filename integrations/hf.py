"""Hugging Face ``Trainer``: a logging callback and a ``compute_loss`` mixin for the regularizer.

Example::

    class ESSTrainer(ESSTrainerMixin, Trainer):
        pass

    trainer = ESSTrainer(model=model, args=args, train_dataset=data,
                         ess_regularizer={"weight": 1e-2},
                         callbacks=[ESSTrainerCallback(probe=input_ids, log_every_n_steps=10)])
"""

from __future__ import annotations

from typing import Any

import torch

from integrations._requires import require

transformers = require("transformers", "hf")

from ess_reg.capture import capture_operators  # noqa: E402
from ess_reg.metric import ESSMetric  # noqa: E402
from ess_reg.regularizer import ESSRegularizer  # noqa: E402


class ESSTrainerCallback(transformers.TrainerCallback):
    """Every ``log_every_n_steps`` steps, compute the ESS of every recognised layer on ``probe``
    (a ``[B, L]`` tensor of token ids, or a dict of model inputs) and add it to the next logs.

    The values (``ess/{layer}/ess``, ``.../utilization``, ``ess/ess/total``, ...) go wherever the
    Trainer reports (``state.log_history``, TensorBoard, ...)."""

    def __init__(self, probe: Any, log_every_n_steps: int = 50, prefix: str = "ess/", **metric_kwargs: Any):
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.probe, self.log_every_n_steps, self.prefix = probe, log_every_n_steps, prefix
        self.metric_kwargs = {"splits": 16, **metric_kwargs}
        self.pending: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.log_every_n_steps:
            return
        metric = ESSMetric(**self.metric_kwargs)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        probe = ({k: v.to(device) for k, v in self.probe.items()} if isinstance(self.probe, dict)
                 else self.probe.to(device))
        try:
            with torch.no_grad():
                operators = (capture_operators(model, **probe) if isinstance(probe, dict)
                             else capture_operators(model, probe))
        finally:
            model.train(was_training)
        metric.update(operators)
        self.pending = {f"{self.prefix}{k}": float(v) for k, v in metric.compute().items() if v.dim() == 0}
        self.last = dict(self.pending)
        control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.pending:
            logs.update(self.pending)
            if state.log_history:
                state.log_history[-1].update(self.pending)
            self.pending = {}


class ESSTrainerMixin:
    """Mix into ``transformers.Trainer``: ``compute_loss`` adds an :class:`ESSRegularizer`'s penalty.

    Pass ``ess_regularizer=`` (a dict of :class:`ESSRegularizer` keyword arguments, or an instance)
    to the trainer's constructor.
    """

    def __init__(self, *args: Any, ess_regularizer: dict[str, Any] | ESSRegularizer | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(ess_regularizer, dict):
            ess_regularizer = ESSRegularizer(self.model, **ess_regularizer)
        self.ess_regularizer = ess_regularizer
        self.ess_penalties: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self.ess_regularizer is None or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        penalty = self.ess_regularizer()
        self.ess_penalties.append(penalty.item())
        loss = loss + penalty.to(loss.device, loss.dtype)
        return (loss, outputs) if return_outputs else loss
