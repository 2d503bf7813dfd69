"""``DiagonalRealization``: a diagonal (or scalar) state-space realization of ``T``."""

from __future__ import annotations

import math
from typing import Any

import torch

from ess_reg.operators._checks import (
    real_dtype_of,
    require_finite,
    require_rank,
    require_seq_len,
    require_tensor,
)
from ess_reg.operators.base import Operator

#: ``log_decay`` above this value means a growing (unstable) state and is rejected.
MAX_LOG_DECAY = 1e-6
#: Without gradients, a materialized probe whose largest entry is at least ``2^-PROBE_REUSE_RANGE``
#: is reused as is: its entries lose nothing above the absolute floor (``1024 * tiny``).
PROBE_REUSE_RANGE = 8.0


class DiagonalRealization(Operator):
    r"""A causal operator given by a diagonal linear recurrence, one per channel (or head).

    .. math::

        h_i = \mathrm{diag}(e^{\ell_i}) h_{i-1} + b_i u_i, \qquad y_i = c_i^\top h_i,

    so that ``T[i, j] = sum_n c[i, n] * b[j, n] * exp(G[i, n] - G[j, n])`` for ``j <= i``, with
    ``G = cumsum(log_decay)`` over time (``log_decay[0]`` never matters). This one form covers linear
    attention (``log_decay=None``), WLA, GLA, RetNet, Mamba-1/S6, Mamba-2/SSD (scalar decay) and S4D.

    Complex factors (S4D, S5): when any of ``c``, ``b``, ``log_decay`` is complex the operator is the
    **real part**, ``T = Re(sum_n ...)``, whose state is the real augmented system of size ``2N``
    (``state_size == 2 * N``). S4D keeps one mode of each conjugate pair and writes its kernel as
    ``2 Re(C Abar^k Bbar)``: pass ``c = 2 * C`` (or double ``b``) to get that kernel.

    Args:
        c: output factors ``[..., C, L, N]`` (batch optional), real or complex.
        b: input factors ``[..., C, L, N]``, same shape as ``c``.
        log_decay: per-step log decay ``[..., C, L, N]`` (diagonal), ``[..., C, L, 1]`` (one scalar
            decay per channel or head, Mamba-2 style) or ``None`` (no decay: linear attention). Its
            real part must be ``<= 0`` (a stable state), up to ``MAX_LOG_DECAY``. An
            input-independent decay ``[C, L, N]`` is shared across the batch of a 4-dim ``c``.
        state_size: the TSS per channel when it is smaller than the default bound (``N``, or ``2 N``
            for complex factors), e.g. ``N`` for a complex system closed under conjugation.
        validate: check shapes, finiteness and stability (one host sync per tensor).
    """

    def __init__(
        self,
        c: torch.Tensor,
        b: torch.Tensor,
        log_decay: torch.Tensor | None = None,
        *,
        state_size: int | None = None,
        validate: bool = True,
    ) -> None:
        require_tensor(c, "c")
        require_tensor(b, "b")
        if log_decay is not None:
            require_tensor(log_decay, "log_decay")
        if log_decay is not None and log_decay.dim() == c.dim() - 1 == 3:
            log_decay = log_decay.expand(c.shape[0], *log_decay.shape)  # shared across the batch
        if validate:
            _validate(c, b, log_decay)
        self._c, self._b, self._log_decay = c, b, log_decay
        bound = self.num_modes * (2 if self.is_complex else 1)
        if state_size is not None and not (isinstance(state_size, int) and 1 <= state_size <= bound):
            raise ValueError(f"state_size must be an int in 1 .. {bound} (the realization's state), "
                             f"got {state_size!r}")
        self._state_size = bound if state_size is None else state_size

    # -- stored tensors -------------------------------------------------------------------------
    @property
    def c(self) -> torch.Tensor:
        """Output factors ``[..., C, L, N]``."""
        return self._c

    @property
    def b(self) -> torch.Tensor:
        """Input factors ``[..., C, L, N]``."""
        return self._b

    @property
    def log_decay(self) -> torch.Tensor | None:
        """Per-step log decay ``[..., C, L, N]``, ``[..., C, L, 1]`` or ``None``."""
        return self._log_decay

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self._c, self._b, self._log_decay) if t is not None)

    def rebuild(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> DiagonalRealization:
        log_decay = tensors[2] if self._log_decay is not None else None
        return DiagonalRealization(tensors[0], tensors[1], log_decay, state_size=self._state_size,
                                   validate=False)

    # -- Operator interface ---------------------------------------------------------------------
    @property
    def is_complex(self) -> bool:
        """Whether the realization is complex (the operator is then its real part)."""
        return any(t.is_complex() for t in self.tensors())

    @property
    def factor_dtype(self) -> torch.dtype:
        """The common dtype of the factors (complex when any factor is complex)."""
        dtype = self._c.dtype
        for t in self.tensors()[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        return dtype

    @property
    def shape(self) -> torch.Size:
        return self._c.shape[:-2]

    @property
    def seq_len(self) -> int:
        return self._c.shape[-2]

    @property
    def num_modes(self) -> int:
        """Number of (possibly complex) state modes ``N`` per channel."""
        return self._c.shape[-1]

    @property
    def state_size(self) -> int:
        """TSS per channel: ``N`` for a real realization, ``2 N`` for a complex one (the real
        augmented state), unless given explicitly (e.g. ``N`` for a complex system that keeps both
        modes of every conjugate pair, as S5 does)."""
        return self._state_size

    @property
    def dtype(self) -> torch.dtype:
        return real_dtype_of(self.factor_dtype)

    @property
    def device(self) -> torch.device:
        return self._c.device

    def to(self, *args: Any, **kwargs: Any) -> DiagonalRealization:
        """Move or cast like :meth:`torch.Tensor.to`. A real ``dtype`` keeps complex factors
        complex (at the matching precision)."""
        moved = [_move(t, args, kwargs) if t is not None else None
                 for t in (self._c, self._b, self._log_decay)]
        return DiagonalRealization(*moved, state_size=self._state_size, validate=False)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Materialize ``T`` as ``[..., C, L, L]`` (real), masking the future before ``exp``.

        Computed in float64 (the cumulative decays lose precision in float32 over long sequences)
        and cast to ``dtype`` (default: :attr:`dtype`). Memory is ``O(L^2 + L^1.5 N)`` per channel.
        """
        out_dtype = self.dtype if dtype is None else dtype
        matrix, exponent = self._scaled_materialize()
        return (matrix * torch.exp2(exponent)[..., None, None]).to(out_dtype)

    def scaled_dense(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T', e)`` with ``T = T' * 2^e`` per channel (see :meth:`Operator.scaled_dense`):
        ``c`` and ``b`` are scaled per channel before any product, so factors far outside
        ``1e-150 .. 1e150`` never under- or overflow."""
        from ess_reg.functional._scaling import normalize_channels

        matrix, exponent = self._scaled_materialize()
        matrix, extra = normalize_channels(matrix, (-2, -1))
        return matrix.to(self.dtype if dtype is None else dtype), exponent + extra

    def _scaled_materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``T`` in float64 with ``c`` and ``b`` scaled by powers of two per channel, and the
        ``[..., C]`` exponent of the scale it lacks.

        The product's own scale (``T`` of the normalized factors may lie far below 1 when the
        peaks of ``c`` and ``b`` sit at positions no block pairs) is measured on a probe without
        gradients and folded into the factors, half into each, so ``T`` comes out with a largest
        entry near 1: scaling ``T`` afterwards would multiply its gradient, which is already as
        large as ``1 / ||block||`` for a block far below the channel's peak, by that scale too.

        Without gradients on the CPU (outside ``torch.func`` transforms) the probe itself is the
        result whenever every channel's product lies within ``2^-PROBE_REUSE_RANGE`` of 1 (the
        usual case): scaling by a power of two is exact, so the fold would only recompute the same
        numbers. Elsewhere (gradients, or an accelerator, where the check would synchronise with
        the host) ``T`` is built a second time.
        """
        from ess_reg.functional._scaling import (
            floor_log_decay,
            normalize_channels,
            power_of_two_exponent,
            times_power_of_two,
        )

        raw_c, raw_b, log_decay = self.factors(torch.float64)
        log_decay = floor_log_decay(log_decay)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in self.tensors())
        with torch.no_grad():
            c, exponent_c = normalize_channels(raw_c, (-2, -1))
            b, exponent_b = normalize_channels(raw_b, (-2, -1))
            probe = materialize(c, b, log_decay)
            extra = power_of_two_exponent(probe.abs().amax(dim=(-2, -1)))  # [..., C]
            # the modes' sum before the decay reaches about 4 N 2^-extra: never let it overflow (what
            # is left of the scale is taken out afterwards by scaled_dense, as before)
            extra = extra.clamp_min(-(1000.0 - math.ceil(math.log2(max(2, c.shape[-1])))))
            if (not needs_grad and probe.device.type == "cpu" and not _functorch_active()
                    and bool((extra >= -PROBE_REUSE_RANGE).all())):
                return probe * torch.exp2(-extra)[..., None, None], exponent_c + exponent_b + extra
        half = torch.floor(extra / 2)
        # each factor scaled from its raw values in one exact step (normalization and fold together),
        # so the derivative never passes through the normalized factor, whose derivative can lie
        # past the float64 range when the channel's entries span more than it
        c = times_power_of_two(raw_c, _scale_exponent(raw_c, -exponent_c - half))
        b = times_power_of_two(raw_b, _scale_exponent(raw_b, half - extra - exponent_b))
        return materialize(c, b, log_decay), exponent_c + exponent_b + extra

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(c, b, log_decay)`` cast to the real ``dtype`` (complex counterpart if complex)."""
        target = _complex_dtype(dtype) if self.is_complex else dtype
        cast = [t.to(target) if t is not None else None for t in (self._c, self._b, self._log_decay)]
        return cast[0], cast[1], cast[2]


def _scale_exponent(raw: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``exponent`` ``[..., C]`` as ``[..., C, 1, 1]``; a channel whose peak is zero or subnormal
    (which :func:`normalize_channels` zeroes) gets ``-4000``, which zeroes it here too (exactly:
    both halves of ``2^-4000`` are 0)."""
    tiny = torch.finfo(raw.real.dtype).tiny
    live = raw.detach().abs().amax(dim=(-2, -1)) >= tiny
    return torch.where(live, exponent, -4000.0)[..., None, None]


def materialize(c: torch.Tensor, b: torch.Tensor, log_decay: torch.Tensor | None) -> torch.Tensor:
    """``Re T[..., i, j] = Re sum_n c[i,n] b[j,n] exp(G[i,n] - G[j,n])`` for ``j <= i``, else 0.

    Shapes: ``c``, ``b`` ``[..., L, N]``; ``log_decay`` ``[..., L, N]``, ``[..., L, 1]`` or None
    (broadcast against ``c``). A per-mode decay is built in column blocks (see
    :func:`_blocked_decay_product`): ``O(L^1.5 N)`` element-wise work and batched products instead of
    ``N`` passes over ``[..., L, L]``.
    """
    length = c.shape[-2]
    causal = torch.ones(length, length, dtype=torch.bool, device=c.device).tril()
    if log_decay is None:
        out = c @ b.mT
        return out.real.masked_fill(~causal, 0) if out.is_complex() else out.masked_fill(~causal, 0)
    cum = torch.cumsum(log_decay, dim=-2)
    if log_decay.shape[-1] == 1:
        out = (c @ b.mT) * masked_decay(cum[..., :, 0], causal)
        return out.real if out.is_complex() else out
    return _blocked_decay_product(c, b, cum)


#: A diagonal block whose decay spans at most this much (``max_j Re(G_s - G_j)`` over its columns
#: ``j`` from its first one ``s``) is one product too: its factors stay within ``e^{+-60}`` of ``c``
#: and ``b`` (at most ``2^500`` after the operator's scaling), far from over- and underflow.
SMOOTH_BLOCK_SPAN = 60.0


def _blocked_decay_product(c: torch.Tensor, b: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """``Re T`` for a per-mode decay with cumulative log-decay ``cum`` ``[..., L, N]``, one block of
    ``w`` columns at a time (``w`` about ``2 sqrt(L)``).

    Below a column block ``[s, e)`` the decay factors through its last column ``r = e - 1``:
    ``exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j)`` for ``j <= r < i``, so the block is one batched
    product of ``c_i exp(G_i - G_r)`` and ``b_j exp(G_r - G_j)``, both exponents at most about 0
    (nothing can overflow that the product itself would not). The block's own rows factor through
    its first column when the decay spans little there (:data:`SMOOTH_BLOCK_SPAN`, checked on the
    CPU with one host read, outside ``torch.compile``), the future then masked; otherwise (a reset
    inside the block, an accelerator, a compiled graph) the causal mask is applied entry by entry,
    on ``[..., w, w, N]``, before ``exp``.
    """
    length = c.shape[-2]
    width = max(1, round(2 * math.sqrt(length)))  # measured best for smooth decays, L = 64 .. 512
    starts = list(range(0, length, width))
    smooth = _smooth_blocks(cum, width)
    blocks = []
    for start, is_smooth in zip(starts, smooth, strict=True):
        end = min(start + width, length)
        rows = slice(start, end)
        if is_smooth:
            origin = cum[..., start: start + 1, :].detach()  # cancels: no gradient (huge and opposite)
            product = (c[..., rows, :] * torch.exp(cum[..., rows, :] - origin)) @ (
                b[..., rows, :] * torch.exp(origin - cum[..., rows, :])).mT
            inner = torch.tril(product.real if product.is_complex() else product)
        else:
            inner = _masked_block(c[..., rows, :], b[..., rows, :], cum[..., rows, :])
        pieces = [inner]
        if start > 0:
            pieces.insert(0, inner.new_zeros(*inner.shape[:-2], start, end - start))
        if end < length:
            anchor = cum[..., end - 1: end, :].detach()  # cancels, as the origin above
            right = b[..., rows, :] * torch.exp(anchor - cum[..., rows, :])
            left = c[..., end:, :] * torch.exp(cum[..., end:, :] - anchor)
            below = left @ right.mT
            pieces.append(below.real if below.is_complex() else below)
        blocks.append(torch.cat(pieces, dim=-2) if len(pieces) > 1 else inner)
    return torch.cat(blocks, dim=-1)


def _smooth_blocks(cum: torch.Tensor, width: int) -> list[bool]:
    """Per block of ``width`` rows: whether its decay spans at most :data:`SMOOTH_BLOCK_SPAN` in
    every channel and mode. One host read on the CPU; all False on an accelerator (no host
    synchronisation), under ``torch.func`` transforms (no data-dependent branch) and under
    ``torch.compile`` (whose guards on the choice would recompile whenever a reset moves)."""
    length = cum.shape[-2]
    count = -(-length // width)
    if cum.device.type != "cpu" or _functorch_active() or torch.compiler.is_compiling():
        return [False] * count  # compiled: a data-dependent choice would recompile as the data moves
    with torch.no_grad():
        first = torch.arange(length, device=cum.device) // width * width
        span = (cum[..., first, :] - cum).real  # G_s - G_j for the block's first row s
        span = span.reshape(-1, length, span.shape[-1]).amax(dim=(0, 2))  # [L]
        span = torch.nn.functional.pad(span, (0, count * width - length), value=-math.inf)
        worst = span.reshape(count, width).amax(dim=-1)
        return (worst <= SMOOTH_BLOCK_SPAN).tolist()


def _masked_block(c: torch.Tensor, b: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """The causal ``[..., w, w]`` diagonal block of ``Re T`` from its own rows of ``c``, ``b`` and
    ``cum`` (``[..., w, N]``), the future masked before ``exp``."""
    width = c.shape[-2]
    causal = torch.ones(width, width, dtype=torch.bool, device=c.device).tril()
    decay = masked_decay(cum.mT, causal)  # [..., N, w, w]
    term = (c.mT[..., :, :, None] * b.mT[..., :, None, :] * decay).sum(dim=-3)
    return term.real if term.is_complex() else term


def masked_decay(cum: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """``exp(cum[i] - cum[j])`` where ``causal[i, j]``, exactly 0 elsewhere, never overflowing.

    ``cum`` is ``[..., L]``; returns ``[..., L, L]``. The exponent is replaced by 0 before ``exp``
    where masked, so neither the value nor the gradient sees the (positive) future exponents.
    """
    diff = cum[..., :, None] - cum[..., None, :]
    safe = torch.where(causal, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
    return torch.where(causal, torch.exp(safe), torch.zeros((), dtype=diff.dtype, device=diff.device))


def _functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``) is running: it forbids the
    data-dependent branch that reuses the probe."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return dtype
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _move(t: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
    if dtype is not None and t.is_complex() and not dtype.is_complex:
        new_args = tuple(_complex_dtype(a) if isinstance(a, torch.dtype) else a for a in args)
        new_kwargs = dict(kwargs, dtype=_complex_dtype(dtype)) if "dtype" in kwargs else kwargs
        return t.to(*new_args, **new_kwargs)
    return t.to(*args, **kwargs)


def _validate(c: torch.Tensor, b: torch.Tensor, log_decay: torch.Tensor | None) -> None:
    require_rank(c, "c", "[batch, C, L, N]")
    if b.shape != c.shape:
        raise ValueError(
            f"b must have the same shape as c [..., C, L, N], got b {tuple(b.shape)} and "
            f"c {tuple(c.shape)}"
        )
    require_seq_len(c.shape[-2], "c")
    if c.shape[-1] < 1:
        raise ValueError(f"c has state dim N = 0 (shape {tuple(c.shape)}); N must be >= 1")
    for name, t in (("b", b), ("log_decay", log_decay)):
        if t is not None and t.device != c.device:
            raise ValueError(f"{name} is on {t.device} but c is on {c.device}; move them together")
    require_finite(c, "c")
    require_finite(b, "b")
    if log_decay is None:
        return
    n = c.shape[-1]
    if log_decay.shape[:-1] != c.shape[:-1] or log_decay.shape[-1] not in (1, n):
        raise ValueError(
            f"log_decay must have shape [..., C, L, N] = {tuple(c.shape)} (diagonal decay) or "
            f"{(*c.shape[:-1], 1)} (scalar decay), got {tuple(log_decay.shape)}"
        )
    require_finite(log_decay, "log_decay")
    if log_decay.numel() == 0:
        return
    growth = log_decay.detach().real.max()
    if bool(growth > MAX_LOG_DECAY):
        raise ValueError(
            f"log_decay has a positive entry {float(growth):.3g} (> {MAX_LOG_DECAY:g}): the state "
            "would grow without bound (unstable); a stable decay has log_decay <= 0, e.g. "
            "log_decay = -softplus(x) or logsigmoid(x)"
        )
