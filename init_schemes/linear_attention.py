"""Linear-attention featurizer initialization: the feature map and its temperature."""

from __future__ import annotations

import torch

from ess_reg.mixers import LinearAttention

#: Feature maps without parameters or buffers whose width equals their input's (``out_dim = d``):
#: ``ess_init`` may swap between them without changing the state size or the parameter set.
PLAIN_FEATURE_MAPS = ("identity", "elu", "relu", "squared_relu")


@torch.no_grad()
def la_feature_map_(mixer: LinearAttention, feature_map: str | None = None,
                    temperature: float | None = None) -> None:
    """Set a linear-attention layer's feature map ``phi`` (by name) and/or its temperature.

    ``q`` and ``k`` are divided by ``temperature`` before ``phi``. A new map is built for the layer's
    ``feature_dim``; maps with parameters (``hedgehog``) or a different width (``taylor``,
    ``performer``) change the parameter set or the state size, so call this before creating the
    optimizer.
    """
    if temperature is not None:
        mixer.temperature = temperature
    if feature_map is not None:
        mixer.set_feature_map(feature_map)


def plain_feature_map(mixer: LinearAttention) -> str | None:
    """The name of the layer's feature map if it is one of ``PLAIN_FEATURE_MAPS``, else None."""
    from ess_reg.mixers import FEATURE_MAPS

    for name in PLAIN_FEATURE_MAPS:
        if type(mixer.feature_map) is FEATURE_MAPS[name]:
            return name
    return None
