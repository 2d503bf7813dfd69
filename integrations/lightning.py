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

from integrations._requires import require

L = require("lightning", "lightning")

from ess_reg.capture import capture_operators  # noqa: E402
from ess_reg.metric import ESSMetric  # noqa: E402
from ess_reg.regularizer import ESSRegularizer  # noqa: E402


def _first_input(batch: Any) -> Any:
    if isinstance(batch, dict):
        return batch.get("input_ids", next(iter(batch.values())))
    if isinstance(batch, list | tuple):
        return batch[0]
    return batch


class ESSCallback(L.Callback):
    """Log the ESS of every recognised mixer every ``log_every_n_steps`` training steps.

    Args:
        log_every_n_steps: logging period (training steps).
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
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps, self.regularizer_kwargs = log_every_n_steps, regularizer
        self.batch_to_input, self.prefix = batch_to_input, prefix
        self.metric_kwargs = {"splits": 16, **metric_kwargs}
        self.regularizer: ESSRegularizer | None = None
        self.last: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.regularizer_kwargs is not None and self.regularizer is None:
            self.regularizer = ESSRegularizer(pl_module, **self.regularizer_kwargs)
            pl_module.ess_reg = self.regularizer

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.regularizer is not None:
            self.regularizer.remove()
            self.regularizer = None
            if hasattr(pl_module, "ess_reg"):
                del pl_module.ess_reg

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.log_every_n_steps:
            return
        metric = ESSMetric(**self.metric_kwargs)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                metric.update(capture_operators(pl_module, self.batch_to_input(batch)))
        finally:
            pl_module.train(was_training)
        values = {f"{self.prefix}{k}": v for k, v in metric.compute().items() if v.dim() == 0}
        self.last = {k: float(v) for k, v in values.items()}
        pl_module.log_dict({k: v.float() for k, v in values.items()}, on_step=True, on_epoch=False)
