"""Effective state-size of causal operators: curves, averages, totals and utilization.

Split ``i`` (``1 <= i <= L-1``) looks at ``H_i = T[i:, :i]``: the outputs from ``i`` on against the
inputs before ``i``. Its rank is the smallest state any recurrence needs to carry across ``i``.
"""

from __future__ import annotations

from typing import Literal

import torch

from ess_reg.functional.dense_route import dense_singular_values
from ess_reg.functional.gramian_route import gramian_singular_values
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
        at the state size for a realization). Values past ``min(i, L - i)`` are zero. Differentiable
        with respect to the operator's tensors.
    """
    op = as_operator(operator)
    compute = _check_dtype(dtype)
    index = resolve_splits(splits, op.seq_len)
    route = _route(op, index, method)
    _require_finite_operator(op)
    rank = max_block_rank(index, op.seq_len)
    if op.state_size is not None:
        rank = min(rank, op.state_size)
    with torch.autocast(op.device.type, enabled=False):
        if route == "gramian":
            assert isinstance(op, DiagonalRealization)
            c, b, log_decay = (_flatten(t) for t in op.factors(compute))
            values = gramian_singular_values(c, b, log_decay, index, rank)
        else:
            values = dense_singular_values(_flatten(op.dense(compute)), index, rank)
    return values.reshape(op.shape + values.shape[-2:]).to(op.dtype)


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

    Other arguments as in :func:`split_singular_values`.
    """
    _check_kind(kind)
    _check_tol(tol)
    values = split_singular_values(operator, splits=splits, method=method, dtype=dtype)
    compute = _check_dtype(dtype)
    sigma = values.to(compute)
    out = entropy_ess(sigma) if kind == "entropy" else tolerance_ess(sigma, tol, relative=relative)
    return out.to(values.dtype)


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
    if op.state_size is not None:
        return curve.mean(dim=-1) / op.state_size
    index = resolve_splits(splits, op.seq_len)
    bound = torch.minimum(index, op.seq_len - index).to(curve.device, curve.dtype)
    return (curve / bound).mean(dim=-1)


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


def _require_finite_operator(op: Operator) -> None:
    """NaN/Inf must not reach the SVD (which can return finite garbage for them): one host sync.

    A finite sum proves every entry finite (NaN and Inf propagate through it) in one pass; only a
    non-finite sum, which huge finite entries can also cause, falls back to the entry-wise check.
    """
    tensors = [t.detach() for t in op.tensors()]
    if bool(torch.stack([torch.isfinite(t.sum()) for t in tensors]).all()):
        return
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if not bool(finite):
        raise ValueError(
            f"the {type(op).__name__} holds NaN or Inf values (a diverged layer?); ESS is undefined "
            "for it. Check the model's activations, or lower the learning rate"
        )


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
