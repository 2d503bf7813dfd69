"""Extractors for real third-party layers, registered with the capture registry.

``register_available()`` registers every extractor whose package is importable; the capture
registry calls it lazily (only for packages the process has already imported), so
``capture_operators``, ``ESSRegularizer``, ``ESSMetric`` and ``ess_init`` recognise these layers with
no extra import.
"""

from __future__ import annotations

import sys

from torch import nn

from integrations.third_party.timm_attention import timm_attention_operator
from integrations.third_party.torch_attention import multihead_attention_operator

_DONE: set[str] = set()


def register_available(*, only_imported: bool = True) -> list[str]:
    """Register extractors for torch, timm and (when imported or ``only_imported=False``)
    transformers. Returns what was registered by this call."""
    from ess_reg.capture import register_extractor

    added = []
    if "torch" not in _DONE:
        register_extractor(nn.MultiheadAttention, multihead_attention_operator)
        _DONE.add("torch")
        added.append("torch.nn.MultiheadAttention")
    if "timm" not in _DONE and (not only_imported or "timm" in sys.modules):
        from timm.layers import Attention

        register_extractor(Attention, timm_attention_operator)
        _DONE.add("timm")
        added.append("timm.layers.Attention")
    if "transformers" not in _DONE and (not only_imported or "transformers" in sys.modules):
        from integrations.third_party import hf_transformers

        added += hf_transformers.register(register_extractor)
        _DONE.add("transformers")
    return added


__all__ = ["register_available"]
