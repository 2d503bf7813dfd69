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
the floating-point range. The caller scales each channel's factors by powers of two and the
log-decay cumsum stays in float64. Without gradients the values are channel-relative. With
gradients the two roots are *balanced* per state coordinate (``tau = sqrt(Sigma_U Sigma_V)`` with
``Sigma`` the roots' column norms, see :meth:`_Segments.spectrum`), so the block's largest value is
about 1 after dividing by ``t^2`` (``t = max tau``), and the backward works with the Gramians of
the balanced roots, ``diag(tau / t) C diag(tau / t)``: ``C`` is the Gramian in coordinates scaled
by each coordinate's root column norm, built by a recursion whose factors are all at most about 1
(every exponent is combined with its scale before ``exp``). So neither ``P`` nor the backward's
``grad / sigma`` weights over- or underflow, whatever the operator's scale.

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

import itertools
import math

import torch

from ess_reg._parallel import parallel_map
from ess_reg.functional._scaling import LN2, RESOLUTION_FACTOR, clean_values, flush_subnormal
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
    segments = _Segments(c, b, log_decay, unique, rank)
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
        self, c: torch.Tensor, b: torch.Tensor, log_decay: torch.Tensor | None, splits: torch.Tensor,
        rank: int,
    ) -> None:
        length = c.shape[-2]
        #: ``[S]`` each split's largest possible rank, ``n`` of the resolution ``8 n eps sigma_max``
        self.rank_bound = torch.minimum(torch.minimum(splits, length - splits), torch.tensor(rank))
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
        self, log_norm_p: torch.Tensor, log_norm_q: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``P^ = U^^H U^`` and ``Q^ = V^^H V^`` of the balanced roots (see :meth:`spectrum`), through
        autograd: ``diag(weight) C diag(weight)``, where ``C`` is the Gramian in state coordinates
        scaled by the root's column norms ``Sigma`` (``log_norm``), accumulated split by split:
        ``C_k = (e e^H) * C_{k-1} + sum_j r~_j r~_j^H`` with ``r~ = r / Sigma_k`` and
        ``e = decay * Sigma_{k-1} / Sigma_k``, every factor at most about 1.
        """
        gram_p = self._accumulate(self.b, self.reach_log, log_norm_p, weight, forward=True)
        gram_q = self._accumulate(self.c, self.observe_log, log_norm_q, weight, forward=False)
        return gram_p, gram_q

    def _accumulate(self, factors, row_log, log_norm, weight, forward: bool) -> torch.Tensor:
        live = torch.isfinite(log_norm)
        part, segment = (self.inputs, self.input_segment) if forward else (self.outputs, self.output_segment)
        # dead coordinates get log Sigma = +inf, so their rows are exactly 0; every other exponent
        # is at most -log|factor| (a row never exceeds its column's norm), so exp cannot overflow
        row_scale = torch.where(live, log_norm, torch.full((), torch.inf, dtype=log_norm.dtype,
                                                            device=log_norm.device))[:, segment]
        exponent_rows = -row_scale if row_log is None else row_log - row_scale
        rows = _decayed_rows(factors[:, part], exponent_rows, self.dtype)
        step = 0.0 if self.anchor_log is None else self.anchor_log[:, 1:] - self.anchor_log[:, :-1]
        both = live[:, :-1] & live[:, 1:]
        # |e| <= 1: a column's norm at the later split includes the decayed earlier one; where the
        # earlier content underflowed in the roots the bound is enforced
        finite = torch.where(live, log_norm, torch.zeros((), dtype=log_norm.dtype, device=log_norm.device))
        ratio = finite[:, :-1] - finite[:, 1:] if forward else finite[:, 1:] - finite[:, :-1]
        carry_log = step + ratio
        real = _bounded_above(carry_log.real, torch.zeros((), dtype=carry_log.real.dtype))
        carry_log = torch.complex(real, carry_log.imag) if carry_log.is_complex() else real
        carry = masked_exp(carry_log, both).to(self.dtype)
        batch, _, n = rows.shape
        gram = rows.new_zeros(batch, n, n)
        out: list[torch.Tensor] = []
        order = range(self.count) if forward else range(self.count - 1, -1, -1)
        # one split into every segment's rows: its backward is one concatenation, where slicing
        # segment by segment would fill a zero tensor of the whole sequence for each
        edges = self.bounds[:-1] if forward else self.bounds[1:]
        segments = torch.split(rows, [hi - lo for lo, hi in itertools.pairwise(edges)], dim=1)
        for k in order:
            seg = segments[k]
            if forward:
                if k > 0:
                    a = carry[:, k - 1]
                    gram = gram * (a[:, :, None] * a.conj()[:, None, :])
                gram = gram + seg.mT @ seg.conj()
            else:
                if k < self.count - 1:
                    a = carry[:, k]
                    gram = gram * (a.conj()[:, :, None] * a[:, None, :])
                gram = gram + seg.mH @ seg
            out.append(gram)
        stacked = torch.stack(out if forward else out[::-1], dim=1)  # [M, S, N', N']
        weight = weight.to(stacked.real.dtype)
        return stacked * (weight[..., :, None] * weight[..., None, :])

    def spectrum(self, needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``[M, S, N']`` scaled singular values and ``[M, S]`` log scales (sorted split order).

        Without gradients the values are channel-relative (log scale 0): the roots are at most about
        ``sqrt(L)`` and a product that underflows lies below the absolute floor anyway. With
        gradients the roots are first *balanced*: ``H = V U^H = V^ U^^H t^2`` with
        ``U^ = U diag(tau / (Sigma_U t))``, ``V^ = V diag(tau / (Sigma_V t))``, ``tau = sqrt(Sigma_U
        Sigma_V)`` per state coordinate (``Sigma`` the roots' column norms) and ``t = max tau``:
        both roots have columns of norm at most 1 and the block's largest singular value is about
        ``t^2``, however differently the two sides weight the coordinates, so the backward's weights
        ``grad / (2 sigma)`` stay in range.
        """
        roots_p, roots_q = self.roots()
        bound = self.rank_bound.to(roots_p.device)
        if not needs_grad:
            chunks = [slice(k, k + _SVD_CHUNK) for k in range(0, self.count, _SVD_CHUNK)]
            pieces = parallel_map(
                lambda part: _singular_values(roots_p[:, part], roots_q[:, part], bound[part]), chunks,
                self.device)
            values = torch.cat(pieces, dim=1)
            log_scale = values.new_zeros(values.shape[:-1])
            return clean_values(values, log_scale, bound), log_scale
        # subnormal entries (the fast QR path keeps them) are below every resolution, and dividing
        # by one (complex division in particular) is not finite
        roots_p, roots_q = flush_subnormal(roots_p), flush_subnormal(roots_q)
        log_norm_p, log_norm_q = _log_column_norms(roots_p), _log_column_norms(roots_q)
        live = torch.isfinite(log_norm_p) & torch.isfinite(log_norm_q)
        log_tau = torch.where(live, (log_norm_p + log_norm_q) / 2, -torch.inf)
        log_t = log_tau.amax(dim=-1)
        log_t = torch.where(torch.isfinite(log_t), log_t, torch.zeros_like(log_t))  # [M, S]
        weight = torch.exp(log_tau - log_t[..., None])  # tau / t: at most 1, 0 for dead coordinates
        root_p = _balanced(roots_p, log_norm_p, log_tau, log_t)
        root_q = _balanced(roots_q, log_norm_q, log_tau, log_t)
        gram_p, gram_q = self.scaled_gramians(log_norm_p, log_norm_q, weight)
        values = _HankelSingularValues.apply(gram_p, gram_q, root_p, root_q, bound)
        exponent = 2 * log_t / LN2  # log2 of t^2
        values = clean_values(values, exponent.to(values.dtype), bound)
        return values, (2 * log_t).to(values.dtype)


#: A decayed row whose entries all stay below this (and whose factors are all non-zero) needs no
#: bound: the bound ``|row| <= e`` of :func:`_decayed_rows` cannot be active.
_ROW_LIMIT = 2.0


def _decayed_rows(factors: torch.Tensor, exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``factors * exp(exponent)`` (``[M, P, N']``), each entry bounded to ``e`` in value.

    A row never exceeds its column's norm (``|entry| <= 1`` of the scaled Gramian), so the bound
    only removes rounding excess, or enforces itself where the root lost a column to underflow.
    A zero factor bounds nothing (its row's exponent may be huge): its row is exactly 0 with a zero
    derivative. On the CPU the plain product is taken when it is finite, every factor is non-zero
    and every entry lies below ``_ROW_LIMIT`` (one host read): the bound is then inactive and the
    result, value and derivative, is the bounded one, in a few element-wise passes instead of
    about fifteen and without the bound's autograd graph.
    """
    if factors.device.type == "cpu" and bool((factors != 0).all()):
        plain = factors * torch.exp(exponent).to(dtype)
        with torch.no_grad():
            fits = bool((plain.abs() <= _ROW_LIMIT).all())  # NaN fails the comparison too
        if fits:
            return plain
    magnitude = factors.detach().abs().expand_as(exponent)
    present = magnitude > 0
    ceiling = -torch.log(torch.where(present, magnitude, torch.ones((), dtype=magnitude.dtype,
                                                                      device=magnitude.device)))
    ceiling = ceiling.double() + 1.0
    real = _bounded_above(exponent.real, ceiling)
    bounded = torch.complex(real, exponent.imag) if exponent.is_complex() else real
    exponent = torch.where(present, bounded, -torch.inf)
    return factors * torch.exp(exponent).to(dtype)


def _bounded_above(x: torch.Tensor, ceiling: torch.Tensor) -> torch.Tensor:
    """``min(x, ceiling)`` in value with the derivative of ``x`` (the bound only removes rounding
    excess or underflowed roots; a plain clamp would cut the gradient where ``x`` sits on it)."""
    straight = x - (x - torch.minimum(x, ceiling)).detach()
    return torch.where(torch.isfinite(x), straight, x)  # -inf (an exact zero) stays -inf


def _log_column_norms(root: torch.Tensor) -> torch.Tensor:
    """``[..., N']`` float64 log of each column's norm of ``root`` ``[..., N', N']`` (``-inf`` for a
    zero column), computed without under- or overflow (each column scaled by its largest entry)."""
    magnitude = root.abs().double()
    peak = magnitude.amax(dim=-2)
    live = peak > 0
    safe = torch.where(live, peak, torch.ones_like(peak))
    scaled = magnitude / safe[..., None, :]  # entries at most 1: the squares cannot overflow
    norm = (scaled * scaled).sum(dim=-2).sqrt()  # ten times faster than vector_norm over dim -2
    return torch.where(live, torch.log(safe) + torch.log(norm), -torch.inf)


def _balanced(root: torch.Tensor, log_norm: torch.Tensor, log_tau: torch.Tensor,
              log_t: torch.Tensor) -> torch.Tensor:
    """``root diag(tau / (Sigma t))``: unit columns scaled by ``tau / t`` (see ``spectrum``)."""
    live = torch.isfinite(log_tau)
    exponent = torch.where(live, log_tau - log_t[..., None] - log_norm, torch.zeros_like(log_tau))
    # a column of norm Sigma times exp(log tau - log t - log Sigma) has norm tau / t <= 1; computed
    # as (root / its column peak) * exp(...) so no intermediate leaves the range
    magnitude = root.abs()
    peak = magnitude.amax(dim=-2, keepdim=True)
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    log_peak = torch.log(safe.double())
    factor = torch.where(live[..., None, :], torch.exp(exponent[..., None, :] + log_peak), 0)
    return (root / safe) * factor.to(root.real.dtype)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


# -- the small SVD and its derivative ---------------------------------------------------------------
def _resolution(values: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``8 n eps sigma_max`` with ``n`` = ``bound`` ``[S]``, each split's largest possible rank."""
    eps = torch.finfo(values.dtype).eps
    return RESOLUTION_FACTOR * bound.to(values.dtype)[:, None] * eps * values[..., :1]


def _singular_values(root_p: torch.Tensor, root_q: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    values = torch.linalg.svdvals(root_q @ root_p.mH)
    return torch.where(values > _resolution(values, bound), values, 0)


class _HankelSingularValues(torch.autograd.Function):
    """``sigma(V U^H)`` whose gradient is routed to the Gramians ``P = U^H U`` and ``Q = V^H V``.

    Called with scaled roots (largest entry about 1), so ``sigma`` is about 1 at most and the
    weights ``grad / (2 sigma)`` stay below about ``1 / resolution``. The forward takes the values
    alone (``svdvals``, accurate to ``eps sigma_max``); the backward forms the singular vectors it
    needs (see :func:`_singular_vectors`).
    """

    @staticmethod
    def forward(ctx, gram_p, gram_q, root_p, root_q, bound):
        values = torch.linalg.svdvals(root_q @ root_p.mH)
        keep = values > _resolution(values, bound)
        values = torch.where(keep, values, 0)
        ctx.save_for_backward(root_p, root_q, values, keep)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        root_p, root_q, values, keep = ctx.saved_tensors
        left, right = _singular_vectors(root_q @ root_p.mH, values, keep)
        w, z = root_q.mH @ left, root_p.mH @ right
        tiny = torch.finfo(values.dtype).tiny
        weight = torch.where(keep, grad_values / (2 * values.clamp_min(tiny)), 0)
        weight = weight.to(w.dtype)[..., None, :]
        return (w * weight) @ w.mH, (z * weight) @ z.mH, None, None, None


def _singular_vectors(matrix: torch.Tensor, values: torch.Tensor, keep: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right singular vectors ``[..., n, n]`` of ``matrix`` for its descending ``values``
    (columns where ``keep`` is False are zero).

    The right vectors are the eigenvectors of ``M^H M``, formed and solved in float64 (complex128)
    whatever the compute dtype, so a value ``sigma`` gets a vector accurate to about
    ``eps_64 sigma_max^2 / gap``, far inside the gradient resolution; the left ones are
    ``M y / sigma``, which pairs each left vector with its right one even inside a cluster of (near)
    equal values. Four times cheaper on the CPU than a batched SVD with vectors at ``n = 8`` or 16.
    """
    wide = torch.complex128 if matrix.is_complex() else torch.float64
    m = matrix.to(wide)
    _, right = torch.linalg.eigh(m.mH @ m)
    right = right.flip(-1)  # descending, as the values
    tiny = torch.finfo(values.dtype).tiny
    scale = torch.where(keep, 1 / values.clamp_min(tiny), 0).to(wide)
    left = (m @ right) * scale[..., None, :]
    right = right * keep.to(right.real.dtype)[..., None, :]
    return left.to(matrix.dtype), right.to(matrix.dtype)
