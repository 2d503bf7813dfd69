r"""Gramian route: singular values of ``H_i = T[i:, :i]`` through ``N x N`` square-root factors.

For a realization ``T[k, j] = c_k^T A_k ... A_{j+1} b_j`` the split block factors as
``H_i = O_i R_i`` (observability from, and reachability to, the state ``h_{i-1}``). With the
Gramians ``P_i = R_i R_i^H`` and ``Q_i = O_i^H O_i``, ``sigma_k(H_i)^2 = lambda_k(P_i Q_i)``.

Squaring loses every singular value below ``sqrt(eps) * sigma_max``, so the forward pass never
forms ``P_i Q_i``: it keeps triangular square roots ``P_i = U_i^H U_i`` and ``Q_i = V_i^H V_i``
(from QR factorizations updated from one requested split to the next) and takes
``sigma(H_i) = sigma(V_i U_i^H)``, an ``N x N`` SVD accurate to about ``eps * sigma_max``.
Values at or below that resolution are reported as exactly zero.

The backward pass differentiates ``sigma`` with respect to the Gramians, which are simple
differentiable functions of ``c``, ``b`` and the decays: for a singular triplet ``(sigma, x, y)`` of
``V U^H``, ``d sigma = (w^H dP w + z^H dQ z) / (2 sigma)`` with ``w = V^H x`` and ``z = U^H y``. Only
values above the resolution take part, so gradients stay finite for rank-deficient blocks, for
splits ``i < N`` and for repeated singular values (no singular-vector derivative is ever formed).

Complex realizations (``T = Re(...)``) are first augmented to the real-output system of twice the
size: ``c' = [c, conj c] / sqrt 2``, ``b' = [b, conj b] / sqrt 2``, decays ``[l, conj l]``.

Both square roots come from two sweeps over the sequence that stop only at the requested splits:
between two splits ``s < s'`` the new inputs ``b_j`` (``s <= j < s'``), already decayed to
``h_{s'-1}``, are stacked under the decayed old root and one QR gives the next root (likewise
backwards for ``V``). Cost per channel: ``O(L N^2 + S N^3)`` time and ``O(L N + S N^2)`` memory for
``S`` splits, so all ``L - 1`` splits cost ``O(L N^3)`` and a few sampled splits ``O(L N^2)``.
"""

from __future__ import annotations

import math

import torch

from ess_reg._parallel import parallel_map
from ess_reg.functional._sweeps import masked_exp, square_root_sweep

#: Splits per batched SVD call (bounds memory and feeds the thread pool).
_SVD_CHUNK = 512
#: Singular values at or below ``_RESOLUTION_FACTOR * n * eps * sigma_max`` are set to zero.
_RESOLUTION_FACTOR = 8.0


def gramian_singular_values(
    c: torch.Tensor,
    b: torch.Tensor,
    log_decay: torch.Tensor | None,
    splits: torch.Tensor,
    rank: int,
) -> torch.Tensor:
    """Singular values of the split blocks of a diagonal realization.

    Args:
        c, b: ``[M, L, N]`` in the compute dtype (real, or complex for a complex realization).
        log_decay: ``[M, L, N]``, ``[M, L, 1]`` or None, same dtype family as ``c``.
        splits: ``[S]`` int64 split indices on the CPU (any order, repeats allowed).
        rank: number of values kept per split (``R <= state size``).

    Returns:
        ``[M, S, R]`` real, descending, exactly zero past ``min(i, L - i)`` and below resolution.
    """
    c, b, log_decay = _augment(c, b, log_decay)
    length = c.shape[-2]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (c, b, log_decay)
    )
    unique, inverse = torch.unique(splits, sorted=True, return_inverse=True)
    segments = _Segments(c, b, log_decay, unique)
    values = segments.singular_values(needs_grad)[:, inverse.to(c.device)]
    width = values.shape[-1]
    values = values[..., :rank] if width >= rank else torch.nn.functional.pad(
        values, (0, rank - width)
    )
    limit = torch.minimum(splits, length - splits).to(values.device)
    keep = torch.arange(rank, device=values.device) < limit[:, None]
    return values * keep


# -- complex augmentation --------------------------------------------------------------------------
def _augment(
    c: torch.Tensor, b: torch.Tensor, log_decay: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not c.is_complex():
        return c, b, log_decay
    half = 1.0 / math.sqrt(2.0)
    c2 = torch.cat([c, c.conj()], dim=-1) * half
    b2 = torch.cat([b, b.conj()], dim=-1) * half
    if log_decay is not None:
        full = log_decay.expand(c.shape)
        log_decay = torch.cat([full, full.conj()], dim=-1)
    return c2, b2, log_decay


# -- the two sweeps --------------------------------------------------------------------------------
class _Segments:
    """Inputs and outputs grouped between consecutive requested splits ``s_1 < ... < s_S``.

    Forward segment ``k`` holds inputs ``j`` in ``[s_{k-1}, s_k)`` (``s_0 = 0``) with rows
    ``r_j = b_j * exp(G_{s_k - 1} - G_j)``; ``reach_decay[k] = exp(G_{s_k - 1} - G_{s_{k-1} - 1})``
    carries the state from one split to the next. Backward segment ``k`` holds outputs ``t`` in
    ``[s_k, s_{k+1})`` (``s_{S+1} = L``) with rows ``o_t = c_t * exp(G_t - G_{s_k - 1})`` and
    ``observe_decay[k] = exp(G_{s_{k+1} - 1} - G_{s_k - 1})``.
    """

    def __init__(
        self, c: torch.Tensor, b: torch.Tensor, log_decay: torch.Tensor | None, splits: torch.Tensor
    ) -> None:
        length = c.shape[-2]
        self.bounds = [0, *splits.tolist(), length]
        self.count = splits.numel()
        self.device = c.device
        if log_decay is None:
            self.reach, self.observe = b, c
            self.reach_decay = self.observe_decay = self.anchor_log = None
            return
        cum = torch.cumsum(log_decay, dim=-2)  # G: [M, L, N']
        time = torch.arange(length)
        split = splits.to(torch.long)
        # Each input's segment end s_k - 1, each output's segment start s_k - 1.
        seg_of_input = torch.searchsorted(split, time, right=True).clamp(max=self.count - 1)
        seg_of_output = (torch.searchsorted(split, time, right=True) - 1).clamp(min=0)
        end = (split[seg_of_input] - 1).to(c.device)
        start = (split[seg_of_output] - 1).to(c.device)
        before_last = (time < split[-1]).to(c.device)[None, :, None]
        self.reach = b * masked_exp(cum[:, end] - cum, before_last)
        from_first = (time >= split[0]).to(c.device)[None, :, None]
        self.observe = c * masked_exp(cum - cum[:, start], from_first)
        anchors = (split - 1).to(c.device)
        previous = torch.cat([anchors[:1], anchors[:-1]])
        following = torch.cat([anchors[1:], anchors[-1:]])
        self.reach_decay = torch.exp(cum[:, anchors] - cum[:, previous])  # [M, S, N']
        self.observe_decay = torch.exp(cum[:, following] - cum[:, anchors])
        self.anchor_log = cum[:, anchors]  # G_{s_k - 1}: [M, S, N']

    # -- square roots (no autograd) --
    def roots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``U_k`` and ``V_k`` with ``P = U^H U`` and ``Q = V^H V`` at every split: ``[M, S, N', N']``."""
        with torch.no_grad():
            reach = self.reach.detach().conj()
            observe = self.observe.detach()
            anchor_log = None if self.anchor_log is None else self.anchor_log.detach()
            reach_log = None if anchor_log is None else anchor_log.conj()
        sweeps = (
            lambda: square_root_sweep(reach, reach_log, self.bounds, forward=True),
            lambda: square_root_sweep(observe, anchor_log, self.bounds, forward=False),
        )
        roots_p, roots_q = parallel_map(lambda sweep: sweep(), sweeps, self.device)
        return roots_p, roots_q

    # -- Gramians (differentiable) --
    def gramians(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``P_k = R R^H`` and ``Q_k = O^H O`` at every split, through autograd: ``[M, S, N', N']``."""
        gram_p, gram_q = [], []
        batch, _, n = self.reach.shape
        gram = self.reach.new_zeros(batch, n, n)
        for k in range(self.count):
            seg = self.reach[:, self.bounds[k]:self.bounds[k + 1]]
            if self.reach_decay is not None:
                a = self.reach_decay[:, k]
                gram = gram * (a[:, :, None] * a.conj()[:, None, :])
            gram = gram + seg.mT @ seg.conj()
            gram_p.append(gram)
        gram = self.observe.new_zeros(batch, n, n)
        for k in range(self.count - 1, -1, -1):
            seg = self.observe[:, self.bounds[k + 1]:self.bounds[k + 2]]
            if self.observe_decay is not None:
                a = self.observe_decay[:, k]
                gram = gram * (a.conj()[:, :, None] * a[:, None, :])
            gram = gram + seg.mH @ seg
            gram_q.append(gram)
        return torch.stack(gram_p, dim=1), torch.stack(gram_q[::-1], dim=1)

    def singular_values(self, needs_grad: bool) -> torch.Tensor:
        """``[M, S, N']`` singular values at the requested splits (sorted order)."""
        roots_p, roots_q = self.roots()
        if needs_grad:
            gram_p, gram_q = self.gramians()
            return _HankelSingularValues.apply(gram_p, gram_q, roots_p, roots_q)
        chunks = [slice(k, k + _SVD_CHUNK) for k in range(0, self.count, _SVD_CHUNK)]
        pieces = parallel_map(
            lambda part: _singular_values(roots_p[:, part], roots_q[:, part]), chunks, self.device
        )
        return torch.cat(pieces, dim=1)


# -- the small SVD and its derivative ---------------------------------------------------------------
def _resolution(values: torch.Tensor, n: int) -> torch.Tensor:
    eps = torch.finfo(values.dtype).eps
    return _RESOLUTION_FACTOR * n * eps * values[..., :1]


def _singular_values(root_p: torch.Tensor, root_q: torch.Tensor) -> torch.Tensor:
    values = torch.linalg.svdvals(root_q @ root_p.mH)
    return torch.where(values > _resolution(values, root_p.shape[-1]), values, 0)


class _HankelSingularValues(torch.autograd.Function):
    """``sigma(V U^H)`` whose gradient is routed to the Gramians ``P = U^H U`` and ``Q = V^H V``."""

    @staticmethod
    def forward(ctx, gram_p, gram_q, root_p, root_q):
        left, values, right_h = torch.linalg.svd(root_q @ root_p.mH, full_matrices=False)
        keep = values > _resolution(values, root_p.shape[-1])
        values = torch.where(keep, values, 0)
        ctx.save_for_backward(root_q.mH @ left, root_p.mH @ right_h.mH, values, keep)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        w, z, values, keep = ctx.saved_tensors
        tiny = torch.finfo(values.dtype).tiny
        weight = torch.where(keep, grad_values / (2 * values.clamp_min(tiny)), 0)
        weight = weight.to(w.dtype)[..., None, :]
        return (w * weight) @ w.mH, (z * weight) @ z.mH, None, None
