"""Hyper-parameters that initializers choose (a gate normalizer, a temperature, a feature map),
kept as plain Python values and saved in ``state_dict``.

A mixer's gate normalizer or temperature is part of what the layer computes, so it must travel with
checkpoints (``load_run``), deep copies and EMA / SWA copies. As Python values they need no host read
in the forward pass, survive ``to_empty()`` after meta-device construction and ``.half()``; as
``state_dict`` entries (0-dim float64 / int64 tensors written by ``_save_to_state_dict``) they load
back with ``load_state_dict``. A state dict from before they were saved still loads (the
constructor's values stay).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class ScalarSetting:
    """Descriptor: a finite float > 0 kept on the module and saved in ``state_dict`` under its name."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, module: nn.Module | None, owner: type | None = None) -> Any:
        if module is None:
            return self
        return module.__dict__["_saved_settings"][self.name]

    def __set__(self, module: nn.Module, value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value > 0):
            raise ValueError(f"{self.name} must be a finite number > 0, got {value!r}")
        module.__dict__.setdefault("_saved_settings", {})[self.name] = float(value)


class SavedSettings:
    """Mixin for a module with :class:`ScalarSetting` attributes (and extra entries from
    :meth:`_extra_settings`): writes them into ``state_dict`` and reads them back."""

    def _extra_settings(self) -> dict[str, torch.Tensor]:
        """Further ``name -> tensor`` entries to save (subclasses)."""
        return {}

    def _load_extra_settings(self, values: Mapping[str, torch.Tensor]) -> None:
        """Apply the entries of :meth:`_extra_settings` found in a state dict (subclasses)."""

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, value in self.__dict__.get("_saved_settings", {}).items():
            destination[prefix + name] = torch.tensor(value, dtype=torch.float64)
        for name, value in self._extra_settings().items():
            destination[prefix + name] = value

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        scalars = self.__dict__.get("_saved_settings", {})
        names = set(scalars) | set(self._extra_settings())
        found = {name: state_dict[prefix + name] for name in names if prefix + name in state_dict}
        for name, value in found.items():
            if name in scalars and not value.is_meta:
                setattr(self, name, float(value))
        self._load_extra_settings({k: v for k, v in found.items() if k not in scalars})
        ours = {prefix + name for name in found}
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(rest, prefix, *args, **kwargs)
