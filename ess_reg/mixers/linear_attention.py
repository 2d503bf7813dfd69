"""``"la"``: multi-head linear attention with a selectable feature map."""

from __future__ import annotations

import torch
from torch import nn

from ess_reg.mixers._kernels import HeadRMSNorm, ShortConv, merge_heads, split_heads
from ess_reg.mixers._settings import SavedSettings, ScalarSetting
from ess_reg.mixers.base import RealizationMixer
from ess_reg.mixers.feature_maps import FEATURE_MAP_NAMES, FEATURE_MAPS, make_feature_map


class LinearAttention(SavedSettings, RealizationMixer):
    """``S_i = S_{i-1} + phi(k_i) v_i^T``, ``y_i = S_i^T phi(q_i) s`` (``A = I``), per head.

    ``T_h[i, j] = s phi(q_i) . phi(k_j)`` with ``s = F^{-1/2}``, or, with ``normalize=True``,
    ``phi(q_i) . phi(k_j) / (phi(q_i) . sum_{m<=i} phi(k_m) + eps)``. TSS per head is the feature
    dimension ``F`` of the map. The output passes a per-head RMSNorm and the output projection.

    Args:
        feature_map: one of ``identity, elu, relu, squared_relu, performer, taylor, hedgehog``.
        feature_dim: width of ``q``/``k`` per head before the map (default: the head dim).
        short_conv: causal depthwise convolution (kernel 4) on ``q``, ``k``, ``v``.
        temperature: ``q`` and ``k`` are divided by it before the feature map.
    """

    name = "la"
    temperature = ScalarSetting()

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        feature_map: str = "elu",
        feature_dim: int | None = None,
        normalize: bool = False,
        short_conv: bool = True,
        eps: float = 1e-6,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = d_model // num_heads
        self.feature_dim = feature_dim or self.head_dim
        self.normalize, self.eps = normalize, eps
        self.set_feature_map(feature_map)
        self.temperature = temperature  # saved in state_dict
        key_width = num_heads * self.feature_dim
        self.q = nn.Linear(d_model, key_width, bias=False)
        self.k = nn.Linear(d_model, key_width, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.conv = ShortConv(2 * key_width + d_model) if short_conv else None
        self.norm = HeadRMSNorm(self.head_dim)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def set_feature_map(self, name: str) -> None:
        """Use the feature map ``name`` (see ``FEATURE_MAPS``), built for this layer's ``feature_dim``
        on its device. The choice is saved in ``state_dict`` and restored by ``load_state_dict``."""
        new = make_feature_map(name, self.feature_dim)
        if self.normalize and not new.positive:
            raise ValueError(f"feature_map {name!r} is not positive, but the layer has normalize=True; "
                             f"pick one of {', '.join(n for n, m in FEATURE_MAPS.items() if m.positive)}")
        reference = next((p for p in self.parameters() if p.is_floating_point()), None)
        self.feature_map = new if reference is None else new.to(reference.device, reference.dtype)
        self._feature_map_name = name

    @property
    def feature_map_name(self) -> str:
        return self._feature_map_name

    def _extra_settings(self) -> dict[str, torch.Tensor]:
        return {"feature_map_code": torch.tensor(FEATURE_MAP_NAMES.index(self._feature_map_name))}

    def _load_extra_settings(self, values) -> None:
        code = values.get("feature_map_code")
        if code is not None and not code.is_meta and FEATURE_MAP_NAMES[int(code)] != self._feature_map_name:
            self.set_feature_map(FEATURE_MAP_NAMES[int(code)])  # before the map's own parameters load

    @property
    def state_size(self) -> int:
        return self.feature_map.out_dim

    def featurize(self, x):
        qkv = torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)
        if self.conv is not None:
            qkv = self.conv(qkv)
        width = self.num_heads * self.feature_dim
        q, k, v = qkv.split([width, width, self.d_model], dim=-1)
        phi_q = self.feature_map(split_heads(q, self.num_heads) / self.temperature, is_query=True)
        phi_k = self.feature_map(split_heads(k, self.num_heads) / self.temperature, is_query=False)
        if self.normalize:
            c = phi_q / ((phi_q * phi_k.cumsum(dim=-2)).sum(-1, keepdim=True) + self.eps)
        else:
            c = phi_q * phi_q.shape[-1] ** -0.5
        return {"c": c, "b": phi_k, "u": split_heads(v, self.num_heads)}




    def readout(self, f, y):
        return self.out(merge_heads(self.norm(y)))
