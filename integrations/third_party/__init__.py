"""Extractors for real third-party layers, registered with the capture registry.

``register_available()`` registers every extractor whose package is importable; the capture
registry calls it lazily (only for packages the process has already imported), so
``capture_operators``, ``ESSRegularizer``, ``ESSMetric`` and ``ess_init`` recognise these layers with
no extra import.
"""

from __future__ import annotations

import sys

from torch import nn

from integrations.third_party.timm_attention import timm_attention_bidirectional, timm_attention_operator
from integrations.third_party.torch_attention import multihead_attention_operator

_DONE: set[str] = set()


def register_available(*, only_imported: bool = True) -> list[str]:
    """Register extractors for torch, timm and (when imported, or when ``only_imported=False``
    and installed) transformers, mambapy and s5-pytorch. Returns what was registered by this call."""
    from ess_reg.capture import register_extractor

    added = []
    if "torch" not in _DONE:
        register_extractor(nn.MultiheadAttention, multihead_attention_operator)
        _DONE.add("torch")
        added.append("torch.nn.MultiheadAttention")
    if "timm" not in _DONE and (not only_imported or "timm" in sys.modules):
        from timm.layers import Attention

        register_extractor(Attention, timm_attention_operator, bidirectional=timm_attention_bidirectional)
        _DONE.add("timm")
        added.append("timm.layers.Attention")
    if "transformers" not in _DONE and (not only_imported or "transformers" in sys.modules):
        try:
            from integrations.third_party import hf_transformers
        except ImportError:  # transformers not installed
            _DONE.add("transformers")
            return added

        added += hf_transformers.register(register_extractor)
        _DONE.add("transformers")
    if "mambapy" not in _DONE and (not only_imported or "mambapy" in sys.modules):
        try:
            from mambapy.mamba import MambaBlock
        except ImportError:
            if not only_imported:
                _DONE.add("mambapy")
        else:
            from integrations.third_party.mambapy_blocks import mambapy_block_operator

            register_extractor(MambaBlock, mambapy_block_operator)
            _DONE.add("mambapy")
            added.append("mambapy.mamba.MambaBlock")
    if "s5" not in _DONE and (not only_imported or "s5" in sys.modules):
        try:
            from s5 import S5
        except ImportError:
            if not only_imported:
                _DONE.add("s5")
        else:
            from integrations.third_party.s5_layers import s5_operator

            register_extractor(S5, s5_operator)
            _DONE.add("s5")
            added.append("s5.S5")
    return added


__all__ = ["register_available"]
