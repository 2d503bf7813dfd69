"""Float hyper-parameters that initializers choose, kept as 0-dim buffers.

A mixer's gate normalizer or temperature is part of what the layer computes, so it must travel with
``state_dict`` (checkpoints, ``load_run``), with deep copies and with EMA / SWA averages (which walk the
state dict and average floating tensors: a constant stays constant).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class ScalarSetting:
    """Descriptor: reads as a Python float, stored in the buffer ``_<name>`` (in ``state_dict``).

    Forward passes read the buffer itself (``self._<name>``), so no value is copied to the host.
    Assigning validates (finite, > 0) and writes into the buffer in place.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.buffer = name, "_" + name

    def __get__(self, module: nn.Module | None, owner: type | None = None) -> Any:
        if module is None:
            return self
        return float(module._buffers[self.buffer])

    def __set__(self, module: nn.Module, value: float) -> None:
        if isinstance(value, torch.Tensor):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value > 0):
            raise ValueError(f"{self.name} must be a finite number > 0, got {value!r}")
        current = module._buffers.get(self.buffer)
        if current is None:
            module.register_buffer(self.buffer, torch.tensor(float(value)))
        else:
            with torch.no_grad():
                current.fill_(float(value))
