"""Feature maps ``phi`` for linear attention: ``[..., d] -> [..., out_dim]``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeatureMap(nn.Module):
    """Base class; ``out_dim`` is the feature (state) dimension the map produces."""

    positive: bool = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    @property
    def out_dim(self) -> int:
        return self.dim

    def forward(self, x: torch.Tensor, *, is_query: bool = True) -> torch.Tensor:
        raise NotImplementedError


class Identity(FeatureMap):
    positive = False

    def forward(self, x, *, is_query=True):
        return x


class EluPlusOne(FeatureMap):
    """``elu(x) + 1`` (Katharopoulos et al.)."""

    def forward(self, x, *, is_query=True):
        return F.elu(x) + 1


class ReLU(FeatureMap):
    """``max(x, 0)``, clamped at ``1e-6`` so normalizers stay positive."""

    def forward(self, x, *, is_query=True):
        return F.relu(x).clamp_min(1e-6)


class SquaredReLU(FeatureMap):
    """``relu(x)^2``, clamped at ``1e-6``."""

    def forward(self, x, *, is_query=True):
        return F.relu(x).pow(2).clamp_min(1e-6)


class Performer(FeatureMap):
    """FAVOR+ positive random features approximating the softmax kernel ``exp(q.k / sqrt d)``.

    ``phi(x) = exp(W x' - |x'|^2 / 2 - m) / sqrt(M)`` with ``x' = x d^{-1/4}``, ``W`` a fixed
    block-orthogonal Gaussian ``[M, d]`` (rows rescaled to chi norms) and ``m`` a stabilizer: a
    per-token max for queries (a row scaling of ``T``) and a detached global max for keys (a constant).
    """

    def __init__(self, dim: int, num_features: int | None = None, seed: int = 0) -> None:
        super().__init__(dim)
        self.num_features = num_features or 2 * dim
        g = torch.Generator().manual_seed(seed)
        blocks, rows = [], 0
        while rows < self.num_features:
            q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
            blocks.append(q.T)
            rows += dim
        weight = torch.cat(blocks)[: self.num_features]
        norms = torch.randn(self.num_features, dim, generator=g).norm(dim=1, keepdim=True)
        self.register_buffer("projection", weight * norms)

    @property
    def out_dim(self) -> int:
        return self.num_features

    def forward(self, x, *, is_query=True):
        x = x * self.dim ** -0.25
        logits = x @ self.projection.T - x.pow(2).sum(-1, keepdim=True) / 2
        if is_query:
            shift = logits.amax(-1, keepdim=True).detach()
        else:
            shift = logits.detach().amax()
        return torch.exp(logits - shift) / math.sqrt(self.num_features) + 1e-6


class Taylor(FeatureMap):
    """Second-order Taylor map of ``exp`` (Based): ``phi(q).phi(k) = 1 + q.k/sqrt(d) + (q.k)^2/(2d)``."""

    @property
    def out_dim(self) -> int:
        return 1 + self.dim + self.dim**2

    def forward(self, x, *, is_query=True):
        first = x * self.dim ** -0.25
        second = (x[..., :, None] * x[..., None, :]).flatten(-2) / (math.sqrt(2) * math.sqrt(self.dim))
        return torch.cat([torch.ones_like(x[..., :1]), first, second], dim=-1)


class Hedgehog(FeatureMap):
    """Learnable map ``[softmax(W x + b), softmax(-(W x + b))]`` (Hedgehog); ``W`` starts at identity."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.layer = nn.Linear(dim, dim)
        with torch.no_grad():
            self.layer.weight.copy_(torch.eye(dim))
            self.layer.bias.zero_()

    @property
    def out_dim(self) -> int:
        return 2 * self.dim

    def forward(self, x, *, is_query=True):
        z = self.layer(x)
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], dim=-1).clamp_min(1e-6)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "identity": Identity,
    "elu": EluPlusOne,
    "relu": ReLU,
    "squared_relu": SquaredReLU,
    "performer": Performer,
    "taylor": Taylor,
    "hedgehog": Hedgehog,
}

#: Stable order of the names: a linear-attention layer saves its map as an index into this tuple.
FEATURE_MAP_NAMES: tuple[str, ...] = tuple(FEATURE_MAPS)


def make_feature_map(name: str, dim: int) -> FeatureMap:
    """Build a feature map by name (see :data:`FEATURE_MAPS`)."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {name!r}")
    return FEATURE_MAPS[name](dim)
