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

from ess_reg.regularizer import ESSRegularizer  # noqa: E402
from integrations._ess_logging import measure_ess, penalty_value  # noqa: E402


class ESSTrainerCallback(transformers.TrainerCallback):
    """Every ``log_every_n_steps`` steps, compute the ESS of every recognised layer on ``probe``
    (a ``[B, L]`` tensor of token ids, or a dict of model inputs) and log it at that step.

    Keys ``ess/<layer>/<stat>`` (``ess``, ``total_ess``, ``utilization``, ``tss``), ``ess/total`` and
    ``ess/mean_utilization`` go wherever the Trainer reports (``state.log_history``, TensorBoard,
    W&B, ...). With :class:`ESSTrainerMixin` they are merged into the step's logs before any
    reporting callback sees them; without it, into the logs and ``state.log_history`` from this
    callback's ``on_log`` (reporting callbacks listed before it miss them)."""

    def __init__(self, probe: Any, log_every_n_steps: int = 50, prefix: str = "ess/", **metric_kwargs: Any):
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or (
                log_every_n_steps < 1):
            raise ValueError(f"log_every_n_steps must be an int >= 1, got {log_every_n_steps!r}")
        self.probe, self.log_every_n_steps, self.prefix = probe, log_every_n_steps, prefix
        self.metric_kwargs = {"splits": 16, **metric_kwargs}
        self.pending: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.log_every_n_steps:
            return
        device = next(model.parameters()).device
        probe = ({k: v.to(device) for k, v in self.probe.items()} if isinstance(self.probe, dict)
                 else self.probe.to(device))
        self.pending = measure_ess(model, probe, self.prefix, self.metric_kwargs)
        self.last = dict(self.pending)
        control.should_log = True

    def take_pending(self) -> dict[str, float]:
        """The values waiting for the next log (then forgotten)."""
        pending, self.pending = self.pending, {}
        return pending

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.pending:
            pending = self.take_pending()
            logs.update(pending)
            if state.log_history:
                state.log_history[-1].update(pending)


class ESSTrainerMixin:
    """Mix into ``transformers.Trainer``: ``compute_loss`` adds an :class:`ESSRegularizer`'s penalty,
    and every training log carries ``ess/penalty`` (mean penalty since the previous log).

    Pass ``ess_regularizer=`` (a dict of :class:`ESSRegularizer` keyword arguments, or an instance)
    to the trainer's constructor; a dict gets ``accumulation_steps`` from
    ``args.gradient_accumulation_steps`` unless it sets it, so the schedule counts optimizer steps.
    Under gradient accumulation the penalty is divided like the loss: by the Trainer when it divides
    the loss, here when the loss was already normalised by the number of items. An attached
    regularizer (``reg.attach()``, e.g. inside an ``ESSOptimizer`` passed as ``optimizers=``) applies
    its gradient in the backward pass and is not added to the loss; its ``last_penalty`` is logged.
    """

    def __init__(self, *args: Any, ess_regularizer: dict[str, Any] | ESSRegularizer | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(ess_regularizer, dict):
            options = {"accumulation_steps": self.args.gradient_accumulation_steps, **ess_regularizer}
            ess_regularizer = ESSRegularizer(self.model, **options)
        self.ess_regularizer = ess_regularizer
        self._ess_history: list[float] = []  # penalties of logged steps, as floats
        self._ess_since_log: list[torch.Tensor] = []  # detached: read on the host only when logged

    @property
    def ess_penalties(self) -> list[float]:
        """Every training micro-batch's penalty so far."""
        return self._ess_history + [float(p) for p in self._ess_since_log]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        reg = self.ess_regularizer
        if reg is None or not model.training or reg.attached:
            return result
        loss, outputs = result if return_outputs else (result, None)
        penalty = reg()
        self._ess_since_log.append(penalty.detach())
        if self._loss_is_scaled_for_accumulation(num_items_in_batch):
            penalty = penalty / getattr(self, "current_gradient_accumulation_steps", 1)
        loss = loss + penalty.to(loss.device, loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether the Trainer leaves this loss undivided by the accumulation steps (it was
        normalised by the number of items), as ``Trainer.training_step`` decides."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            accepts = bool(getattr(self, "model_accepts_loss_kwargs", False))
            scaled = (accepts and num_items_in_batch is not None) or (
                getattr(self, "compute_loss_func", None) is not None)
        return bool(scaled)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``ess/penalty`` and the ESS values of any :class:`ESSTrainerCallback` to ``logs``."""
        reg = self.ess_regularizer
        if reg is not None and "loss" in logs:  # a training log, not evaluation or the summary
            recent = [float(p) for p in self._ess_since_log]
            self._ess_history += recent
            self._ess_since_log = []
            if recent:
                logs["ess/penalty"] = sum(recent) / len(recent)
            elif reg.attached and penalty_value(reg) is not None:
                logs["ess/penalty"] = penalty_value(reg)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ESSTrainerCallback):
                logs.update(callback.take_pending())
        super().log(logs, *args, **kwargs)
