r"""Gramian route: singular values of ``H_i = T[i:, :i]`` through ``N x N`` square-root factors.

For a realization ``T[k, j] = c_k^T A_k ... A_{j+1} b_j`` the split block factors as
``H_i = O_i R_i`` (observability from, and reachability to, the state ``h_{i-1}``). With the
Gramians ``P_i = R_i R_i^H`` and ``Q_i = O_i^H O_i``, ``sigma_k(H_i)^2 = lambda_k(P_i Q_i)``.

Squaring loses every singular value below ``sqrt(eps) * sigma_max``, so the forward pass never
forms ``P_i Q_i``: it keeps triangular square roots ``P_i = U_i^H U_i`` and ``Q_i = V_i^H V_i``
(from QR factorizations updated from one requested split to the next) and takes
``sigma(H_i) = sigma(V_i U_i^H)``, an ``N x N`` SVD accurate to about ``eps * sigma_max``.
Values at or below that resolution are reported as exactly zero.

**Scaled form.** Trained models produce resets (log-decays of -1e3), channels and positions many
orders of magnitude apart; squared quantities such as ``P`` and ``1 / sigma^2`` would then leave
the floating-point range. Everything is therefore carried relative to a scale: the caller scales
each channel's factors by powers of two, the log-decay cumsum stays in float64, each split's
roots are scaled by a power of two (``U' = U / 2^e``), and the singular values come back as
``sigma / 2^(e_U + e_V)`` with the scale as a logarithm. The backward works with scaled Gramians
``P' = U'^H U' = diag(rho) C diag(rho)``: ``C`` is the Gramian in coordinates scaled by each
state coordinate's root column norm, built by a recursion whose factors are all at most about 1
(every exponent is combined in log space before ``exp``), and ``rho`` the column norms of ``U'``.
So neither ``P`` nor the backward's ``grad / sigma`` weights over- or underflow, whatever the
operator's scale.

The backward pass differentiates ``sigma`` with respect to the (scaled) Gramians, which are simple
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
from ess_reg.functional._scaling import LN2, RESOLUTION_FACTOR, clean_values, normalize_channels
from ess_reg.functional._sweeps import masked_exp, square_root_sweep

#: Splits per batched SVD call (bounds memory and feeds the thread pool).
_SVD_CHUNK = 512


def gramian_singular_values(
    c: torch.Tensor,
    b: torch.Tensor,
    log_decay: torch.Tensor | None,
    splits: torch.Tensor,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of the split blocks of a diagonal realization, in scaled form.

    Args:
        c, b: ``[M, L, N]`` in the compute dtype (real, or complex for a complex realization),
            each channel scaled to a largest entry of about 1, subnormals flushed.
        log_decay: ``[M, L, N]``, ``[M, L, 1]`` or None, in float64 (complex128 for a complex
            realization) whatever the compute dtype.
        splits: ``[S]`` int64 split indices on the CPU (any order, repeats allowed).
        rank: number of values kept per split (``R <= state size``).

    Returns:
        ``values`` ``[M, S, R]`` (real, descending, exactly zero past ``min(i, L - i)`` and below
        resolution) and ``log_scale`` ``[M, S]``: the singular values are
        ``values * exp(log_scale)``.
    """
    c, b, log_decay = _augment(c, b, log_decay)
    length = c.shape[-2]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (c, b, log_decay)
    )
    unique, inverse = torch.unique(splits, sorted=True, return_inverse=True)
    segments = _Segments(c, b, log_decay, unique)
    values, log_scale = segments.spectrum(needs_grad)
    inverse = inverse.to(c.device)
    values, log_scale = values[:, inverse], log_scale[:, inverse]
    width = values.shape[-1]
    values = values[..., :rank] if width >= rank else torch.nn.functional.pad(
        values, (0, rank - width)
    )
    limit = torch.minimum(splits, length - splits).to(values.device)
    keep = torch.arange(rank, device=values.device) < limit[:, None]
    return values * keep, log_scale


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
    ``r_j = b_j * exp(G_{s_k - 1} - G_j)``; backward segment ``k`` holds outputs ``t`` in
    ``[s_k, s_{k+1})`` (``s_{S+1} = L``) with rows ``o_t = c_t * exp(G_t - G_{s_k - 1})``. The
    exponents are kept in float64 (``G`` is the log-decay cumsum) and only meet ``exp`` combined
    with the scales they are measured against. Only rows some segment holds are formed (inputs
    before ``s_S``, outputs from ``s_1`` on); the others are zero.
    """

    def __init__(
        self, c: torch.Tensor, b: torch.Tensor, log_decay: torch.Tensor | None, splits: torch.Tensor
    ) -> None:
        length = c.shape[-2]
        self.c, self.b = c, b
        self.bounds = [0, *splits.tolist(), length]
        self.count = splits.numel()
        self.device, self.dtype = c.device, c.dtype
        self.inputs = slice(0, self.bounds[-2])  # rows of the forward segments
        self.outputs = slice(self.bounds[1], length)  # rows of the backward segments
        time = torch.arange(length)
        split = splits.to(torch.long)
        after = torch.searchsorted(split, time, right=True)
        self.input_segment = after.clamp(max=self.count - 1).to(c.device)[self.inputs]
        self.output_segment = (after - 1).clamp(min=0).to(c.device)[self.outputs]
        if log_decay is None:
            self.reach_log = self.observe_log = self.anchor_log = None
            return
        cum = torch.cumsum(log_decay, dim=-2)  # G: [M, L, N'] in float64 / complex128
        anchors = (split - 1).to(c.device)
        # G_{s_k - 1} - G_j for inputs and G_t - G_{s_k - 1} for outputs: never positive
        self.reach_log = cum[:, anchors[self.input_segment]] - cum[:, self.inputs]
        self.observe_log = cum[:, self.outputs] - cum[:, anchors[self.output_segment]]
        self.anchor_log = cum[:, anchors]  # G_{s_k - 1}: [M, S, N']

    def _full(self, rows: torch.Tensor, part: slice) -> torch.Tensor:
        """``[M, L, N']`` with ``rows`` at ``part`` and zeros elsewhere."""
        length = self.c.shape[-2]
        return torch.nn.functional.pad(rows, (0, 0, part.start, length - part.stop))

    # -- square roots (no autograd) --
    def roots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``U_k`` and ``V_k`` with ``P = U^H U`` and ``Q = V^H V`` at every split: ``[M, S, N', N']``."""
        with torch.no_grad():
            reach, observe = self.b[:, self.inputs].detach(), self.c[:, self.outputs].detach()
            if self.reach_log is not None:
                reach = reach * torch.exp(self.reach_log.detach()).to(self.dtype)
                observe = observe * torch.exp(self.observe_log.detach()).to(self.dtype)
            reach = self._full(reach, self.inputs).conj()
            observe = self._full(observe, self.outputs)
            anchor_log = _detached(self.anchor_log)
            reach_log = None if anchor_log is None else anchor_log.conj()
        sweeps = (
            lambda: square_root_sweep(reach, reach_log, self.bounds, forward=True),
            lambda: square_root_sweep(observe, anchor_log, self.bounds, forward=False),
        )
        roots_p, roots_q = parallel_map(lambda sweep: sweep(), sweeps, self.device)
        return roots_p, roots_q

    # -- scaled Gramians (differentiable) --
    def scaled_gramians(
        self, root_p: torch.Tensor, exponent_p: torch.Tensor, root_q: torch.Tensor, exponent_q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``P'_k = U'^H U'`` and ``Q'_k = V'^H V'`` of the scaled roots, through autograd.

        Each is ``diag(rho) C diag(rho)`` with ``rho`` the column norms of the scaled root and ``C``
        the Gramian in coordinates scaled by the unscaled root's column norms ``Sigma = rho 2^e``,
        accumulated split by split: ``C_k = (e e^H) * C_{k-1} + sum_j r~_j r~_j^H`` with
        ``r~ = r / Sigma_k`` and ``e = decay * Sigma_{k-1} / Sigma_k``, both at most about 1.
        """
        gram_p = self._accumulate(self.b, self.reach_log, root_p, exponent_p, forward=True)
        gram_q = self._accumulate(self.c, self.observe_log, root_q, exponent_q, forward=False)
        return gram_p, gram_q

    def _accumulate(self, factors, row_log, root, exponent, forward: bool) -> torch.Tensor:
        # column norms of the scaled root (largest entry about 1: the squares cannot overflow, and a
        # column whose squares underflow is below every split's resolution)
        power = root.real.square() + root.imag.square() if root.is_complex() else root.square()
        rho = power.sum(-2).sqrt()
        live = rho > 0
        safe = torch.where(live, rho, torch.ones((), dtype=rho.dtype, device=rho.device))
        log_norm = torch.log(safe.double()) + exponent.double()[..., None] * LN2  # log Sigma
        part, segment = (self.inputs, self.input_segment) if forward else (self.outputs, self.output_segment)
        # dead coordinates get log Sigma = +inf, so their rows are exactly 0; every other exponent
        # is at most -log|factor| (a row never exceeds its column's norm), so exp cannot overflow
        row_scale = torch.where(live, log_norm, torch.full((), torch.inf, dtype=log_norm.dtype,
                                                            device=rho.device))[:, segment]
        exponent_rows = -row_scale if row_log is None else row_log - row_scale
        rows = factors[:, part] * torch.exp(exponent_rows).to(self.dtype)
        step = 0.0 if self.anchor_log is None else self.anchor_log[:, 1:] - self.anchor_log[:, :-1]
        both = live[:, :-1] & live[:, 1:]
        if forward:  # carried from split k-1 to k
            carry = masked_exp(step + log_norm[:, :-1] - log_norm[:, 1:], both).to(self.dtype)
        else:  # carried from split k+1 to k
            carry = masked_exp(step + log_norm[:, 1:] - log_norm[:, :-1], both).to(self.dtype)
        batch, _, n = rows.shape
        gram = rows.new_zeros(batch, n, n)
        out: list[torch.Tensor] = []
        order = range(self.count) if forward else range(self.count - 1, -1, -1)
        offset = part.start
        for k in order:
            if forward:
                seg = rows[:, self.bounds[k] - offset:self.bounds[k + 1] - offset]
                if k > 0:
                    a = carry[:, k - 1]
                    gram = gram * (a[:, :, None] * a.conj()[:, None, :])
                gram = gram + seg.mT @ seg.conj()
            else:
                seg = rows[:, self.bounds[k + 1] - offset:self.bounds[k + 2] - offset]
                if k < self.count - 1:
                    a = carry[:, k]
                    gram = gram * (a.conj()[:, :, None] * a[:, None, :])
                gram = gram + seg.mH @ seg
            out.append(gram)
        stacked = torch.stack(out if forward else out[::-1], dim=1)  # [M, S, N', N']
        weight = rho.to(stacked.real.dtype)
        return stacked * (weight[..., :, None] * weight[..., None, :])

    def spectrum(self, needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``[M, S, N']`` scaled singular values and ``[M, S]`` log scales (sorted split order).

        Without gradients the values are channel-relative (log scale 0): the roots are at most about
        ``sqrt(L)`` and a product that underflows lies below the absolute floor anyway. With
        gradients each split's roots are scaled to a largest entry of about 1 first, so that the
        backward's weights stay in range.
        """
        roots_p, roots_q = self.roots()
        if not needs_grad:
            chunks = [slice(k, k + _SVD_CHUNK) for k in range(0, self.count, _SVD_CHUNK)]
            pieces = parallel_map(
                lambda part: _singular_values(roots_p[:, part], roots_q[:, part]), chunks, self.device
            )
            values = torch.cat(pieces, dim=1)
            exponent = values.new_zeros(values.shape[:-1])
        else:
            root_p, exponent_p = normalize_channels(roots_p, (-2, -1))
            root_q, exponent_q = normalize_channels(roots_q, (-2, -1))
            exponent = exponent_p + exponent_q
            gram_p, gram_q = self.scaled_gramians(root_p, exponent_p, root_q, exponent_q)
            values = _HankelSingularValues.apply(gram_p, gram_q, root_p, root_q)
        values = clean_values(values, exponent, roots_p.shape[-1])
        return values, (exponent * LN2).to(values.dtype)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


# -- the small SVD and its derivative ---------------------------------------------------------------
def _resolution(values: torch.Tensor, n: int) -> torch.Tensor:
    eps = torch.finfo(values.dtype).eps
    return RESOLUTION_FACTOR * n * eps * values[..., :1]


def _singular_values(root_p: torch.Tensor, root_q: torch.Tensor) -> torch.Tensor:
    values = torch.linalg.svdvals(root_q @ root_p.mH)
    return torch.where(values > _resolution(values, root_p.shape[-1]), values, 0)


class _HankelSingularValues(torch.autograd.Function):
    """``sigma(V U^H)`` whose gradient is routed to the Gramians ``P = U^H U`` and ``Q = V^H V``.

    Called with scaled roots (largest entry about 1), so ``sigma`` is about 1 at most and the
    weights ``grad / (2 sigma)`` stay below about ``1 / resolution``.
    """

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
