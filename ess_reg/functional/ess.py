"""Effective state-size of causal operators: curves, averages, totals and utilization.

Split ``i`` (``1 <= i <= L-1``) looks at ``H_i = T[i:, :i]``: the outputs from ``i`` on against the
inputs before ``i``. Its rank is the smallest state any recurrence needs to carry across ``i``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from ess_reg.functional import dense_route
from ess_reg.functional._scaling import (
    LN2,
    floor_log_decay,
    flush_subnormal_cast,
    limit_gradient,
    normalize_channels,
    power_of_two_exponent,
)
from ess_reg.functional.gramian_route import gramian_singular_values
from ess_reg.functional.memory import memory_budget, require_fits
from ess_reg.functional.spectrum import entropy_ess, tolerance_ess
from ess_reg.functional.splits import Splits, max_block_rank, resolve_splits
from ess_reg.operators import DiagonalRealization, Operator, as_operator

Kind = Literal["entropy", "tolerance"]
Method = Literal["auto", "dense", "gramian"]
OperatorLike = Operator | torch.Tensor

#: Default tolerance of tolerance-ESS, relative to the block's largest singular value.
DEFAULT_TOL = 1e-3
_METHODS = ("auto", "dense", "gramian")
_KINDS = ("entropy", "tolerance")
_COMPUTE_DTYPES = (torch.float32, torch.float64)


class SplitSpectrum(NamedTuple):
    """Singular values of the split blocks in scaled form: ``sigma = values * exp(log_scale)``.

    ``values`` ``[..., C, S, R]`` (compute dtype, descending, each split's largest in ``[1, 2)`` or
    the split all zero, exactly zero past ``min(i, L - i)`` and below resolution) and ``log_scale``
    ``[..., C, S]`` (no gradient). ESS depends only on ``values``; the scale keeps blocks far below
    or above their channel's magnitude exact (a float32 compute dtype holds ``values`` of a block
    ``1e-30`` below its channel as well as those of the channel's largest block).
    """

    values: torch.Tensor
    log_scale: torch.Tensor

    def singular_values(self) -> torch.Tensor:
        """``values * exp(log_scale)`` in float64 (or the values' dtype if it is wider)."""
        wide = torch.promote_types(self.values.dtype, torch.float64)
        return self.values.to(wide) * torch.exp(self.log_scale.to(wide))[..., None]


def split_spectrum(
    operator: OperatorLike,
    *,
    splits: Splits = None,
    method: Method = "auto",
    dtype: torch.dtype = torch.float64,
) -> SplitSpectrum:
    """Singular values of every split block ``H_i = T[i:, :i]`` in scaled form (see
    :class:`SplitSpectrum`), in the compute ``dtype``; arguments as in
    :func:`split_singular_values`. Differentiable through ``values``."""
    op = as_operator(operator)
    compute = _check_dtype(dtype)
    index = resolve_splits(splits, op.seq_len)
    route = _route(op, index, method)
    op, finite = _finite_operator(op)
    rank = max_block_rank(index, op.seq_len)
    if op.state_size is not None:
        rank = min(rank, op.state_size)
    if math.prod(op.shape) == 0:  # no channel (or an empty batch): nothing to compute
        empty = torch.zeros(*op.shape, index.numel(), rank, dtype=compute, device=op.device)
        return SplitSpectrum(empty, empty[..., 0])
    with torch.autocast(op.device.type, enabled=False):
        if route == "gramian":
            assert isinstance(op, DiagonalRealization)
            values, log_scale = _gramian_spectrum(op, index, rank, compute)
        else:
            values, log_scale = _dense_spectrum(op, index, rank, compute)
    exponent = power_of_two_exponent(values[..., 0].detach())  # each split's largest into [1, 2)
    values = values * torch.exp2(-exponent)[..., None]
    log_scale = log_scale + exponent * LN2
    values = limit_gradient(values) if values.requires_grad else values
    if finite is not None:  # accelerators: a non-finite operator gives NaN, never a finite guess
        values = torch.where(finite, values, torch.nan)
    return SplitSpectrum(values.reshape(op.shape + values.shape[-2:]),
                         log_scale.reshape(op.shape + log_scale.shape[-1:]))


def split_singular_values(
    operator: OperatorLike,
    *,
    splits: Splits = None,
    method: Method = "auto",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Singular values of every split block ``H_i = T[i:, :i]``, descending.

    Args:
        operator: a ``DenseOperator``, a ``DiagonalRealization`` or a raw ``[..., C, L, L]`` tensor.
        splits: ``None`` (all ``1 .. L-1``), an int ``k`` (``k`` evenly spaced splits) or a 1-D
            tensor / sequence of split indices.
        method: ``"dense"`` (SVD of each block of the materialized ``T``, ``O(L^4)`` per channel),
            ``"gramian"`` (``N x N`` square-root Gramians of a realization, ``O(L N^3)``) or
            ``"auto"`` (gramian for a realization whose state is smaller than the largest block,
            dense otherwise).
        dtype: compute dtype, ``torch.float64`` (default) or ``torch.float32``. fp16/bf16 operators
            are computed in it too.

    Returns:
        ``[..., C, S, R]`` in the operator's dtype, where ``R = max_i min(i, L - i)`` (also capped
        at the state size for a realization). Values past ``min(i, L - i)`` and at or below
        ``8 n eps sigma_max`` of their block are zero. Differentiable with respect to the
        operator's tensors, except values at or below the gradient resolution (``1e-4 sigma_max``
        of their block in float64 compute, ``1e-3`` in float32), which carry no gradient (see
        docs/ess.md). Values that the operator's dtype cannot hold (a float32 operator's blocks
        below ``1e-38``, a float16 operator's above 65504) become 0 or ``inf`` here;
        :func:`split_spectrum` keeps them in scaled form, and the ESS functions use it.
    """
    spectrum = split_spectrum(operator, splits=splits, method=method, dtype=dtype)
    return spectrum.singular_values().to(as_operator(operator).dtype)


def _gramian_spectrum(op: DiagonalRealization, index: torch.Tensor, rank: int,
                      compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled factors, channel chunks that fit the memory budget, then the Gramian route."""
    c, b, log_decay, channel_log = _scaled_factors(op, compute)
    count, length, modes = c.shape
    width = 2 * modes if c.is_complex() else modes
    needs_grad = torch.is_grad_enabled() and op.requires_grad
    # measured peaks (rows, exponents and roots in float64 or complex128; the Gramian recursion and
    # what autograd saves of it with gradients), with a margin
    wide = 16 if c.is_complex() else 8
    per_channel = wide * (length * width * (36 if needs_grad else 20)
                          + index.numel() * width * width * (30 if needs_grad else 10))
    chunks = 1
    if needs_grad:
        require_fits(per_channel * count, op.device,
                     f"the Gramian route with gradients ({count} channels, L={length}, "
                     f"{index.numel()} splits, state {width})",
                     "pass fewer splits= (e.g. splits=16) or a smaller batch (ESSRegularizer: "
                     "max_operators=K measures a random K of the operators)")
    else:
        budget = memory_budget(op.device)
        require_fits(per_channel, op.device, f"the Gramian route for one channel (L={length}, "
                     f"{index.numel()} splits, state {width})", "pass fewer splits= (e.g. splits=64)")
        chunks = max(1, -(-per_channel * count // budget))
    step = -(-count // chunks)
    pieces = [gramian_singular_values(c[s:s + step], b[s:s + step],
                                      None if log_decay is None else log_decay[s:s + step], index, rank)
              for s in range(0, count, step)]
    values = torch.cat([p[0] for p in pieces]) if chunks > 1 else pieces[0][0]
    log_scale = torch.cat([p[1] for p in pieces]) if chunks > 1 else pieces[0][1]
    return values, log_scale + channel_log[:, None].to(log_scale.dtype)


def _dense_spectrum(op: Operator, index: torch.Tensor, rank: int,
                    compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialize ``T`` (checked against the memory budget first), scale each channel, route."""
    length = op.seq_len
    count = math.prod(op.shape)
    precise = torch.float64 if torch.float64 in (op.dtype, compute) else compute
    itemsize = torch.empty((), dtype=compute).element_size()
    # T in the precise dtype and in the compute dtype, plus the temporaries of building it (a
    # realization materializes mode by mode: about six L x L float64 arrays, twice as wide if complex)
    precise_size = torch.empty((), dtype=precise).element_size()
    building = 0
    if isinstance(op, DiagonalRealization):
        building = 8 * (12 if op.is_complex else 6)
    held = count * length * length * (precise_size + itemsize + building)
    workers = max(1, torch.get_num_threads())
    smallest_task = 4 * itemsize * (length * length // 4 + length)  # one channel, one middle split
    require_fits(held + workers * smallest_task, op.device,
                 f"the dense route ({count} channels of {length} x {length})",
                 "evaluate fewer channels or a shorter sequence, pass splits= to sample fewer splits, "
                 "or use method='gramian' for a state-space realization")
    spare = memory_budget(op.device) - held
    element_budget = max(1, min(dense_route.MEMORY_BUDGET, spare // (workers * 4 * itemsize)))
    matrix, exponent = op.scaled_dense(precise)
    matrix, exponent = _flatten(matrix), exponent.reshape(-1)
    matrix = flush_subnormal_cast(matrix, compute)
    values, log_scale = dense_route.dense_singular_values(matrix, index, rank, element_budget)
    return values, log_scale + (exponent * LN2)[:, None].to(log_scale.dtype)


def _scaled_factors(
    op: DiagonalRealization, compute: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``[M, L, N]`` factors in the compute dtype, each channel's ``c`` and ``b`` scaled by a power
    of two to a largest entry in ``[1, 2)`` (in their own dtype, before the cast), subnormals
    flushed; the log-decay in float64 (complex128), its real part floored at
    ``LOG_DECAY_FLOOR``; and ``[M]`` the channels' log scales."""
    target = (torch.complex128 if compute == torch.float64 else torch.complex64) if op.is_complex else compute
    c, exponent_c = normalize_channels(_flatten(op.c), (-2, -1))
    b, exponent_b = normalize_channels(_flatten(op.b), (-2, -1))
    c, b = flush_subnormal_cast(c, target), flush_subnormal_cast(b, target)
    log_decay = _flatten(op.log_decay)
    if log_decay is not None:
        wide = torch.complex128 if op.is_complex else torch.float64
        log_decay = floor_log_decay(log_decay.to(wide))
    return c, b, log_decay, (exponent_c + exponent_b) * LN2


def ess_curve(
    operator: OperatorLike,
    kind: Kind = "entropy",
    *,
    tol: float = DEFAULT_TOL,
    relative: bool = True,
    splits: Splits = None,
    method: Method = "auto",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """ESS at each split: ``[..., C, S]`` in the operator's dtype.

    ``kind="entropy"``: ``exp(-sum p log p)`` with ``p = sigma / sum(sigma)`` (0 for an all-zero
    block); differentiable, with finite gradients for rank-deficient blocks. ``kind="tolerance"``:
    the number of singular values ``> tol`` (``> tol * sigma_max(H_i)`` when ``relative``; the
    default ``tol=1e-3`` relative is the library's choice, the paper does not state one); no
    gradient. Every ESS obeys ``ESS_i <= min(i, L - i)`` (and ``<= N`` for a realization), so the
    curve always falls to at most 1 at ``i = L - 1``.

    Other arguments as in :func:`split_singular_values`. Singular values stay in the compute
    ``dtype`` (and in scaled form, see :func:`split_spectrum`) until the ESS is formed; only the
    result is cast to the operator's dtype.
    """
    _check_kind(kind)
    _check_tol(tol)
    op = as_operator(operator)
    spectrum = split_spectrum(op, splits=splits, method=method, dtype=dtype)
    if kind == "entropy":
        out = entropy_ess(spectrum.values)
    elif relative:
        out = tolerance_ess(spectrum.values, tol, relative=True)
    else:
        out = tolerance_ess(spectrum.singular_values(), tol, relative=False)
    return out.to(op.dtype)


def average_ess(operator: OperatorLike, kind: Kind = "entropy", **kwargs) -> torch.Tensor:
    """ESS averaged over splits: ``[..., C]``. Keyword arguments as in :func:`ess_curve`."""
    return ess_curve(operator, kind, **kwargs).mean(dim=-1)


def total_ess(operator: OperatorLike, kind: Kind = "entropy", **kwargs) -> torch.Tensor:
    """Average ESS summed over channels and averaged over the batch: a scalar.

    On the same scale as the layer's total state ``C * N``
    (see :func:`theoretical_state_size` with ``total=True``).
    """
    per_channel = average_ess(operator, kind, **kwargs)
    return per_channel.sum(dim=-1).mean() if per_channel.dim() > 1 else per_channel.sum()


def theoretical_state_size(operator: OperatorLike, *, total: bool = False) -> int | None:
    """Theoretical state size (TSS): ``N`` per channel for a realization (``2 N`` if complex).

    ``total=True`` gives the layer's whole state, ``C * N``. ``None`` for a dense operator, which has
    no finite state (softmax attention keeps every past token).
    """
    op = as_operator(operator)
    if op.state_size is None:
        return None
    return op.state_size * op.num_channels if total else op.state_size


def utilization(operator: OperatorLike, kind: Kind = "entropy", **kwargs) -> torch.Tensor:
    """State utilization per channel, ``[..., C]``: average ESS divided by the TSS ``N``.

    For an operator without a finite state (dense), each split's ESS is divided by the largest
    rank that split allows, ``min(i, L - i)``, before averaging. Values lie in ``[0, 1]``:
    near 1 the layer saturates its state, near 0 it collapses.
    """
    op = as_operator(operator)
    return utilization_from_curve(ess_curve(op, kind, **kwargs), op, splits=kwargs.get("splits"))


def utilization_from_curve(
    curve: torch.Tensor, operator: OperatorLike, *, splits: Splits = None
) -> torch.Tensor:
    """Utilization ``[..., C]`` from an already computed ESS curve ``[..., C, S]`` (see
    :func:`utilization`); ``splits`` must be the ones the curve was computed on."""
    op = as_operator(operator)
    index = resolve_splits(splits, op.seq_len)
    return (curve / split_capacity(op, index).to(curve.device, curve.dtype)).mean(dim=-1)


def split_capacity(operator: OperatorLike, splits: Splits = None) -> torch.Tensor:
    """The largest ESS each split allows, ``[S]`` (float64): the TSS ``N`` of a realization, or
    ``min(i, L - i)`` for an operator without a finite state. Every utilization in ess-reg (metric,
    regularizer, summaries) is ESS divided by this."""
    op = as_operator(operator)
    index = resolve_splits(splits, op.seq_len)
    if op.state_size is not None:
        return torch.full(index.shape, float(op.state_size), dtype=torch.float64, device=index.device)
    return torch.minimum(index, op.seq_len - index).to(torch.float64)


# -- argument checks and helpers -------------------------------------------------------------------
#: A layer on the dense route longer than this takes seconds per channel at all ``L - 1`` splits:
#: ``layer_report`` then defaults to ``SAMPLED_DENSE_SPLITS`` evenly spaced splits, ``ESSMetric`` warns.
LONG_DENSE_LEN = 257
SAMPLED_DENSE_SPLITS = 64


def _is_long_dense(op: Operator) -> bool:
    return op.seq_len > LONG_DENSE_LEN and resolve_method(op) == "dense"


def resolve_method(operator: OperatorLike, *, splits: Splits = None, method: Method = "auto") -> str:
    """The route ``method`` resolves to for this operator and these splits: "dense" or "gramian".

    ``"auto"`` picks the gramian route for a realization whose state size is below the largest
    block rank ``max_i min(i, L - i)`` among the splits, and the dense route otherwise.
    """
    op = as_operator(operator)
    return _route(op, resolve_splits(splits, op.seq_len), method)


def _route(op: Operator, splits: torch.Tensor, method: str) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "gramian" and not isinstance(op, DiagonalRealization):
        raise ValueError(
            f"method='gramian' needs a state realization (DiagonalRealization), got "
            f"{type(op).__name__}; use method='dense' or 'auto'"
        )
    if method != "auto":
        return method
    if isinstance(op, DiagonalRealization) and op.state_size < max_block_rank(splits, op.seq_len):
        return "gramian"
    return "dense"


def _finite_operator(op: Operator, defer: bool | None = None) -> tuple[Operator, torch.Tensor | None]:
    """NaN/Inf must not reach the SVD, which can return finite garbage for them.

    On the CPU: a ``ValueError`` (a finite sum proves every entry finite, since NaN and Inf
    propagate through it; only a non-finite sum, which huge finite entries can also cause, falls
    back to the entry-wise check); returns ``(op, None)``. On an accelerator the check stays on the
    device, so the training step never waits for the host: returns the operator with every tensor
    zeroed if any entry is not finite, and the 0-dim flag with which the caller turns all its values
    into NaN (a diverged layer then gives a NaN penalty, as its loss is NaN too). ``defer``
    chooses between the two (default: defer off the CPU); an operator type without
    :meth:`~ess_reg.Operator.rebuild` is always checked on the host.
    """
    tensors = [t.detach() for t in op.tensors()]
    if op.device.type != "cpu" if defer is None else defer:
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        try:
            return op.rebuild([torch.where(finite, t, torch.zeros((), dtype=t.dtype, device=t.device))
                               for t in op.tensors()]), finite
        except NotImplementedError:
            pass
    if bool(torch.stack([torch.isfinite(t.sum()) for t in tensors]).all()):
        return op, None
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if not bool(finite):
        raise ValueError(
            f"the {type(op).__name__} holds NaN or Inf values (a diverged layer?); ESS is undefined "
            "for it. Check the model's activations, or lower the learning rate"
        )
    return op, None


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(
            f"dtype must be torch.float64 or torch.float32 (the SVD precision), got {dtype}; "
            "fp16/bf16 operators are upcast automatically"
        )
    return dtype


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")


def _check_tol(tol: float) -> None:
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0 or tol == float("inf"):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")


def _flatten(t: torch.Tensor | None) -> torch.Tensor | None:
    """``[..., C, L, X] -> [M, L, X]`` with ``M`` = batch x channels."""
    return None if t is None else t.reshape(-1, *t.shape[-2:])
