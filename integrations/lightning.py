"""Lightning: ``ESSCallback`` logs ``ESSMetric`` and can own an ``ESSRegularizer``.

Example::

    class Model(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = criterion(self(x), y)
            return loss + self.ess_reg()          # set up by ESSCallback(regularizer={...})

    trainer = L.Trainer(callbacks=[ESSCallback(log_every_n_steps=50, regularizer={"weight": 1e-2})])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from integrations._ess_logging import log_key, measure_ess, penalty_value
from integrations._requires import require

L = require("lightning", "lightning")

from ess_reg.optim import ESSOptimizer  # noqa: E402
from ess_reg.regularizer import ESSRegularizer  # noqa: E402


def _first_input(batch: Any) -> Any:
    if isinstance(batch, dict):
        return batch.get("input_ids", next(iter(batch.values())))
    if isinstance(batch, list | tuple):
        return batch[0]
    return batch


class ESSCallback(L.Callback):
    """Log the ESS of every recognised mixer every ``log_every_n_steps`` optimizer steps.

    Values are measured on the current training batch (eval mode, no gradients) and written straight
    to the trainer's loggers at the callback's own cadence, whatever the Trainer's
    ``log_every_n_steps``: keys ``ess/<layer>/<stat>`` (``ess``, ``total_ess``, ``utilization``,
    ``tss``), ``ess/total``, ``ess/mean_utilization`` and, when a regularizer is in use (its own or
    an ``ESSOptimizer``'s), ``ess/penalty`` (the last step's). They also land in
    ``trainer.callback_metrics`` (for ``ModelCheckpoint(monitor=...)``) and in ``callback.last``.

    Args:
        log_every_n_steps: logging period (optimizer steps, ``trainer.global_step``).
        regularizer: keyword arguments of an :class:`ESSRegularizer` to create in ``setup`` (as
            ``pl_module.ess_reg``, for ``training_step`` to add ``self.ess_reg()``) and remove in
            ``teardown``; None for no regularizer.
        batch_to_input: maps a batch to the model input (default: ``batch[0]``, ``batch["input_ids"]``
            or the batch itself).
        prefix: prefix of the logged keys.
        metric_kwargs: passed to :class:`ESSMetric` (default ``splits=16``).
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        *,
        regularizer: dict[str, Any] | None = None,
        batch_to_input: Callable[[Any], Any] = _first_input,
        prefix: str = "ess/",
        **metric_kwargs: Any,
    ) -> None:
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or (
                log_every_n_steps < 1):
            raise ValueError(f"log_every_n_steps must be an int >= 1, got {log_every_n_steps!r}")
        self.log_every_n_steps, self.regularizer_kwargs = log_every_n_steps, regularizer
        self.batch_to_input, self.prefix = batch_to_input, prefix
        self.metric_kwargs = {"splits": 16, **metric_kwargs}
        self.regularizer: ESSRegularizer | None = None
        self.last: dict[str, float] = {}
        self._logged_step = -1
        self._saved_regularizer: dict[str, Any] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.regularizer_kwargs is not None and self.regularizer is None:
            options = {"accumulation_steps": int(getattr(trainer, "accumulate_grad_batches", 1) or 1),
                       **self.regularizer_kwargs}  # the schedule counts optimizer steps
            self.regularizer = ESSRegularizer(pl_module, **options)
            pl_module.ess_reg = self.regularizer
            self._restore_regularizer()

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the owned regularizer's schedule and sampler RNG, so a
        run resumed with ``ckpt_path`` continues exactly."""
        regularizer = None if self.regularizer is None else self.regularizer.state_dict()
        return {"logged_step": self._logged_step, "regularizer": regularizer}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._logged_step = int(state_dict.get("logged_step", -1))
        self._saved_regularizer = state_dict.get("regularizer")
        self._restore_regularizer()

    def _restore_regularizer(self) -> None:
        if self.regularizer is not None and self._saved_regularizer is not None:
            self.regularizer.load_state_dict(self._saved_regularizer)
            self._saved_regularizer = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.regularizer is not None:
            self.regularizer.remove()
            self.regularizer = None
            if hasattr(pl_module, "ess_reg"):
                del pl_module.ess_reg

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._logged_step or step % self.log_every_n_steps:
            return  # not on the cadence, or this optimizer step was logged (gradient accumulation)
        self._logged_step = step
        values = measure_ess(pl_module, self.batch_to_input(batch), self.prefix, self.metric_kwargs)
        penalty = self._penalty(trainer)
        if penalty is not None:
            values[log_key(self.prefix, "penalty")] = penalty
        self.last = values
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})

    def _penalty(self, trainer) -> float | None:
        """The last penalty of this callback's regularizer, or of an ``ESSOptimizer``'s."""
        owners = [self.regularizer]
        owners += [o.regularizer for o in trainer.optimizers if isinstance(o, ESSOptimizer)]
        values = [penalty_value(r) for r in owners if r is not None]
        return next((v for v in values if v is not None), None)
