r"""Gramian route: singular values of ``H_i = T[i:, :i]`` through ``N x N`` square-root factors.

For a realization ``T[k, j] = c_k^T A_k ... A_{j+1} b_j`` the split block factors as
``H_i = O_i R_i`` (observability from, and reachability to, the state ``h_{i-1}``). With the
Gramians ``P_i = R_i R_i^H`` and ``Q_i = O_i^H O_i``, ``sigma_k(H_i)^2 = lambda_k(P_i Q_i)``.

Squaring loses every singular value below ``sqrt(eps) * sigma_max``, so the forward pass never
forms ``P_i Q_i``: it keeps triangular square roots ``P_i = U_i^H U_i`` and ``Q_i = V_i^H V_i``
(from QR factorizations, updated step by step or built per split) and takes
``sigma(H_i) = sigma(V_i U_i^H)``, an ``N x N`` SVD accurate to about ``eps * sigma_max``.
Values at or below that resolution are reported as exactly zero.

The backward pass differentiates ``sigma`` with respect to the Gramians, which are simple
differentiable functions of ``c``, ``b`` and the decays: for a singular triplet ``(sigma, x, y)`` of
``V U^H``, ``d sigma = (w^H dP w + z^H dQ z) / (2 sigma)`` with ``w = V^H x`` and ``z = U^H y``. Only
values above the resolution take part, so gradients stay finite for rank-deficient blocks, for
splits ``i < N`` and for repeated singular values (no singular-vector derivative is ever formed).

Complex realizations (``T = Re(...)``) are first augmented to the real-output system of twice the
size: ``c' = [c, conj c] / sqrt 2``, ``b' = [b, conj b] / sqrt 2``, decays ``[l, conj l]``.

Cost per channel: ``O(L N^3)`` for all splits (sequential sweeps), ``O(S L N^2)`` for ``S`` sampled
splits (built directly, no sweep).
"""

from __future__ import annotations

import math

import torch

from ess_reg._parallel import parallel_map

#: At most this many splits are built directly; more use the two sequential sweeps.
_DIRECT_MAX_SPLITS = 48
#: Splits per batched SVD call in the sequential mode (bounds memory).
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
        splits: ``[S]`` int64 split indices on the CPU.
        rank: number of values kept per split (``R <= state size``).

    Returns:
        ``[M, S, R]`` real, descending, exactly zero past ``min(i, L - i)`` and below resolution.
    """
    c, b, log_decay = _augment(c, b, log_decay)
    length = c.shape[-2]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (c, b, log_decay)
    )
    sorted_splits, order = torch.sort(splits)
    if splits.numel() <= _DIRECT_MAX_SPLITS:
        values = _direct(c, b, log_decay, sorted_splits, needs_grad)
    else:
        values = _sequential(c, b, log_decay, sorted_splits, needs_grad)
    values = values[:, torch.argsort(order).to(values.device)]
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


# -- direct mode: each split's factors built explicitly ---------------------------------------------
def _direct(
    c: torch.Tensor,
    b: torch.Tensor,
    log_decay: torch.Tensor | None,
    splits: torch.Tensor,
    needs_grad: bool,
) -> torch.Tensor:
    """Reachability ``R_i`` and observability ``O_i`` per split, zero-padded to ``L`` rows."""
    length = c.shape[-2]
    device = c.device
    time = torch.arange(length, device=device)
    split = splits.to(device)
    past = time[None, :] < split[:, None]  # [S, L]: inputs j < i
    if log_decay is None:
        reach = b[:, None] * past[None, :, :, None]  # rows r_j^T  [M, S, L, N]
        observe = c[:, None] * (~past)[None, :, :, None]
    else:
        cum = torch.cumsum(log_decay, dim=-2)  # [M, L, N']
        anchor = cum[:, split - 1][:, :, None]  # G_{i-1}: [M, S, 1, N']
        reach = b[:, None] * _masked_exp(anchor - cum[:, None], past[None, :, :, None])
        observe = c[:, None] * _masked_exp(cum[:, None] - anchor, (~past)[None, :, :, None])
    with torch.no_grad():
        root_p = torch.linalg.qr(reach.detach().conj(), mode="r")[1]  # P = U^H U
        root_q = torch.linalg.qr(observe.detach(), mode="r")[1]  # Q = V^H V
    if not needs_grad:
        return _singular_values(root_p, root_q)
    gram_p = reach.mT @ reach.conj()  # P = R R^H with R[:, j] = r_j
    gram_q = observe.mH @ observe
    return _HankelSingularValues.apply(gram_p, gram_q, root_p, root_q)


def _masked_exp(exponent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=exponent.dtype, device=exponent.device)
    return torch.where(keep, torch.exp(torch.where(keep, exponent, zero)), zero)


# -- sequential mode: two sweeps of QR updates -------------------------------------------------------
def _sequential(
    c: torch.Tensor,
    b: torch.Tensor,
    log_decay: torch.Tensor | None,
    splits: torch.Tensor,
    needs_grad: bool,
) -> torch.Tensor:
    """Forward sweep for ``U_i`` (and ``P_i``), backward sweep for ``V_i`` (and ``Q_i``)."""
    length = c.shape[-2]
    decay = None if log_decay is None else torch.exp(log_decay)  # [M, L, N'] or [M, L, 1]
    wanted = splits.tolist()
    first, last = wanted[0], wanted[-1]
    sweeps = (
        lambda: _forward_roots(b.detach(), _detach(decay), wanted, last),
        lambda: _backward_roots(c.detach(), _detach(decay), wanted, first, length),
    )
    roots_p, roots_q = parallel_map(lambda sweep: sweep(), sweeps, c.device)
    if not needs_grad:
        chunks = [slice(k, k + _SVD_CHUNK) for k in range(0, len(wanted), _SVD_CHUNK)]
        pieces = parallel_map(
            lambda part: _singular_values(roots_p[:, part], roots_q[:, part]), chunks, c.device
        )
        return torch.cat(pieces, dim=1)
    gram_p = _forward_gramians(b, decay, wanted, last)
    gram_q = _backward_gramians(c, decay, wanted, first, length)
    return _HankelSingularValues.apply(gram_p, gram_q, roots_p, roots_q)


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _step_decay(decay: torch.Tensor | None, t: int) -> torch.Tensor | None:
    return None if decay is None else decay[:, t]


def _collect(states: list[torch.Tensor], wanted: list[int], times: dict[int, int]) -> torch.Tensor:
    return torch.stack([states[times[i]] for i in wanted], dim=1)


def _forward_roots(
    b: torch.Tensor, decay: torch.Tensor | None, wanted: list[int], last: int
) -> torch.Tensor:
    """``U_i`` (``P_i = U_i^H U_i``) for the wanted splits: ``[M, S, N, N]``."""
    batch, _, n = b.shape
    slots = _slots(wanted)
    out = b.new_empty(batch, len(wanted), n, n)
    stacked = b.new_zeros(batch, n + 1, n)  # rows: U * conj(a), then conj(b_t)
    for t in range(last):
        a = _step_decay(decay, t)
        if a is not None:
            stacked[:, :n] *= a.conj()[:, None, :]
        stacked[:, n] = b[:, t].conj()
        stacked[:, :n] = torch.linalg.qr(stacked, mode="r")[1]
        for k in slots.get(t + 1, ()):
            out[:, k] = stacked[:, :n]
    return out


def _backward_roots(
    c: torch.Tensor, decay: torch.Tensor | None, wanted: list[int], first: int, length: int
) -> torch.Tensor:
    """``V_i`` (``Q_i = V_i^H V_i``) for the wanted splits: ``[M, S, N, N]``."""
    batch, _, n = c.shape
    slots = _slots(wanted)
    out = c.new_empty(batch, len(wanted), n, n)
    stacked = c.new_zeros(batch, n + 1, n)  # rows: c_t^T, then V_{t+1}
    for t in range(length - 1, first - 1, -1):
        stacked[:, 0] = c[:, t]
        a = _step_decay(decay, t)
        if a is not None:
            stacked *= a[:, None, :]
        stacked[:, 1:] = torch.linalg.qr(stacked, mode="r")[1]
        for k in slots.get(t, ()):
            out[:, k] = stacked[:, 1:]
    return out


def _slots(wanted: list[int]) -> dict[int, list[int]]:
    """Split index -> positions in ``wanted`` (repeated splits fill several positions)."""
    slots: dict[int, list[int]] = {}
    for k, i in enumerate(wanted):
        slots.setdefault(i, []).append(k)
    return slots


def _forward_gramians(
    b: torch.Tensor, decay: torch.Tensor | None, wanted: list[int], last: int
) -> torch.Tensor:
    """Differentiable ``P_{i+1} = A_i P_i A_i^H + b_i b_i^H`` for the wanted splits."""
    batch, _, n = b.shape
    gram = torch.zeros(batch, n, n, dtype=b.dtype, device=b.device)
    states, times = [], {}
    want = set(wanted)
    for t in range(last):
        a = _step_decay(decay, t)
        if a is not None:
            gram = gram * (a[:, :, None] * a.conj()[:, None, :])
        gram = gram + b[:, t, :, None] * b[:, t, None, :].conj()
        if t + 1 in want:
            times[t + 1] = len(states)
            states.append(gram)
    return _collect(states, wanted, times)


def _backward_gramians(
    c: torch.Tensor, decay: torch.Tensor | None, wanted: list[int], first: int, length: int
) -> torch.Tensor:
    """Differentiable ``Q_i = A_i^H (conj(c_i) c_i^T + Q_{i+1}) A_i`` for the wanted splits."""
    batch, _, n = c.shape
    gram = torch.zeros(batch, n, n, dtype=c.dtype, device=c.device)
    states, times = [], {}
    want = set(wanted)
    for t in range(length - 1, first - 1, -1):
        gram = gram + c[:, t, :, None].conj() * c[:, t, None, :]
        a = _step_decay(decay, t)
        if a is not None:
            gram = gram * (a.conj()[:, :, None] * a[:, None, :])
        if t in want:
            times[t] = len(states)
            states.append(gram)
    return _collect(states, wanted, times)


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
    def forward(ctx, gram_p, gram_q, root_p, root_q):  # noqa: D102
        left, values, right_h = torch.linalg.svd(root_q @ root_p.mH, full_matrices=False)
        keep = values > _resolution(values, root_p.shape[-1])
        values = torch.where(keep, values, 0)
        ctx.save_for_backward(root_q.mH @ left, root_p.mH @ right_h.mH, values, keep)
        return values

    @staticmethod
    def backward(ctx, grad_values):  # noqa: D102
        w, z, values, keep = ctx.saved_tensors
        tiny = torch.finfo(values.dtype).tiny
        weight = torch.where(keep, grad_values / (2 * values.clamp_min(tiny)), 0)
        weight = weight.to(w.dtype)[..., None, :]
        return (w * weight) @ w.mH, (z * weight) @ z.mH, None, None
