"""``ESSRegularizer``: a differentiable effective-state-size term for the loss or the backward pass."""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ess_reg.capture import hook_operators, recomputing
from ess_reg.functional import entropy_ess, split_capacity, split_spectrum
from ess_reg.functional.spectrum import _keep_nan
from ess_reg.operators import Operator
from ess_reg.regularizer.injection import _InjectPenalty
from ess_reg.regularizer.options import (
    PerLayer,
    Schedule,
    SplitFn,
    Target,
    as_number,
    batch_mean,
    batch_splits,
    check_factor,
    check_target,
    check_weight,
    per_layer,
    sampled_batch_mean,
    schedule_factor,
    target_term,
)
from ess_reg.regularizer.sampling import (
    check_max_operators,
    is_linear,
    layer_generator,
    operator_count,
    sample_operators,
)
from ess_reg.regularizer.selection import ModuleSelector, select_modules

_KINDS = ("entropy", "soft_tolerance")


class ESSRegularizer:
    """A differentiable effective-state-size penalty for the recognised mixers of ``model``.

    Hooks every recognised mixer (or those selected by ``modules``); each forward keeps the mixer's
    operator, attached to the autograd graph. ``reg()`` then returns ``factor(step) * mean over layers
    of w_l f_l(v_l)``, where ``v_l`` is layer ``l``'s ESS averaged over the step's splits, channels
    and batch:

    - ``normalize=True`` (default): ``v_l`` is the utilization, ESS / TSS (for an operator without a
      finite state, ESS_i / ``min(i, L - i)``), in ``[0, 1]``, so ``weight`` means the same for every
      layer;
    - ``target="max"``: ``f(v) = 1 - v`` (``-v`` unnormalized) rewards ESS and fights state collapse;
      ``"min"``: ``f(v) = v`` pushes towards a smaller effective state (easier distillation); a float
      ``t``: ``f(v) = (v - t)^2``; ``("at_least", u)``: ``f(v) = relu(u - v)``, a floor that costs
      nothing once the layer holds ``u`` (a utilization, or an absolute ESS with ``normalize=False``,
      e.g. the number of items a task must hold).

    ``kind="entropy"`` uses entropy-ESS; ``"soft_tolerance"`` a smooth count of singular values
    above ``tol * sigma_max``, ``sum_k sigmoid((log(sigma_k / sigma_max) - log tol) / temperature)``
    (tolerance-ESS itself has no gradient).

    Args:
        model: the model whose mixers are regularized.
        weight: the penalty's weight ``w``: one number, a dict by module name (layers missing from it
            are not regularized) or ``f(name) -> weight``.
        target: as above; also one for all, a dict by module name or ``f(name) -> target``.
        splits: where to measure: an int ``k`` (``k`` random splits, drawn afresh every step), fixed
            split indices, ``None`` (all ``L - 1`` splits), or ``f(inputs) -> [B, S]`` index tensor
            (or ``[S]``), called with the model's first positional input (``input_ids`` if passed by
            keyword) at each forward, so the penalty sits where the task needs memory (e.g.
            :meth:`ess_reg.tasks.MQAR.boundary_splits`). ``reg(splits=...)`` overrides it for the
            last forward.
        schedule: the weight's factor per step: ``"constant"``, ``"linear_decay"`` or
            ``"cosine_decay"`` (from 1 at step 0 to 0 at ``total_steps``), or ``f(step) -> factor``.
            Steps with a zero factor build no operator.
        total_steps: the decay's length.
        every_n_steps: penalise every that many steps, counted from the end of the warm-up; on
            skipped steps ``reg()`` returns a zero tensor and no operator is built. One call of
            ``reg()`` (or one ``ESSOptimizer.step``) is one step.
        warmup_steps: skip this many first steps.
        accumulation_steps: micro-batches per optimizer step under gradient accumulation: in
            loss-term mode the schedule advances once every that many ``reg()`` calls (divide the
            loss, penalty included, as usual); in attached mode each backward's injected penalty
            is divided by it, as the loss is.
        dtype: compute dtype of the singular values (float64 default).
        generator: ``torch.Generator`` for the split sampling (CPU).
        tol: the relative tolerance of ``kind="soft_tolerance"``.
        temperature: the sigmoid's temperature of ``kind="soft_tolerance"``.
        max_operators: at most this many of a layer's ``batch x channels`` operators enter each
            step's penalty, drawn uniformly at random (per step and layer, from ``generator``): an
            unbiased estimate of the layer's mean at a fraction of the cost on wide layers (a Mamba
            block has ``d_inner`` channels per example). ``"auto"`` (default) keeps each layer's
            penalty to about ``AUTO_BUDGET`` (3e7) multiply-adds a step: GLA-sized layers keep every
            operator, a Mamba layer of ``d_inner`` 512 at batch 4 about 180 of its 2048, softmax
            attention at ``L = 256`` 8 (docs/performance.md measures the noise this adds); ``None``:
            all of them.

    Use as ``loss = task_loss + reg()`` after each forward, or call :meth:`attach` (or wrap the
    optimizer in :class:`ess_reg.ESSOptimizer`) to apply the penalty's gradient inside
    ``loss.backward()`` without touching the loss.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        weight: float | PerLayer = 1e-2,
        kind: str = "entropy",
        target: Target | PerLayer = "max",
        normalize: bool = True,
        modules: ModuleSelector = None,
        splits: int | Sequence[int] | torch.Tensor | SplitFn | None = 8,
        schedule: Schedule = "constant",
        total_steps: int | None = None,
        every_n_steps: int = 1,
        warmup_steps: int = 0,
        accumulation_steps: int = 1,
        dtype: torch.dtype = torch.float64,
        generator: torch.Generator | None = None,
        tol: float = 1e-3,
        temperature: float = 0.5,
        max_operators: int | str | None = "auto",
    ) -> None:
        _check_config(kind, splits, every_n_steps, warmup_steps, dtype, tol, temperature)
        self.max_operators = check_max_operators(max_operators)
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or (
                accumulation_steps < 1):
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        self.accumulation_steps = accumulation_steps
        self._micro_steps = 0  # reg() calls in the current optimizer step (loss-term mode)
        self._micro_sum: torch.Tensor | None = None  # their penalties / accumulation_steps
        self.model = model
        self.weight, self.kind, self.target, self.normalize = weight, kind, target, normalize
        self.splits = splits if splits is None or isinstance(splits, int) or callable(splits) else (
            torch.as_tensor(splits, dtype=torch.long))
        self.schedule, self.total_steps = schedule, total_steps
        self._factor = schedule_factor(schedule, total_steps)
        self.every_n_steps, self.warmup_steps = every_n_steps, warmup_steps
        self.dtype, self.tol, self.temperature = dtype, tol, temperature
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        chosen = select_modules(model, modules)
        weights = per_layer(weight, list(chosen), "weight", check_weight, default=0.0)
        targets = per_layer(target, list(chosen), "target", check_target, default="max")
        if as_number(weight) is not None:  # one weight: every chosen layer, even at 0
            self.modules = chosen
        else:
            self.modules = {n: m for n, m in chosen.items() if as_number(weights[n]) != 0}
            if not self.modules:
                raise ValueError(f"weight gives every layer a zero weight; the mixers are {list(chosen)}")
        self.layer_weights = {n: as_number(weights[n]) for n in self.modules}
        self.layer_targets = {n: targets[n] for n in self.modules}
        self.step_count = 0
        self.operators: dict[str, Operator] = {}
        self.values: dict[str, torch.Tensor] = {}
        self._attached = False
        self._grad_scaler: Any = None
        self._split_cache: dict[int, torch.Tensor] = {}
        self._split_step = -1
        self._pending: dict[str, list[tuple[Operator, Any, object]]] = {}  # loss-term: (op, splits, token)
        self._backwarded: set[object] = set()  # tokens of pending forwards a backward went through
        self._forward_splits: Any = None  # this forward's splits from a callable ``splits``
        self._forward_tokens: set[object] = set()  # tokens of the pending entries this forward added
        self._calls: dict[str, int] = {}  # calls of each layer in the model's current forward
        self._step_terms: list[torch.Tensor] = []  # attached mode: terms built in this step's backward
        self._last_penalty: torch.Tensor | None = None
        self._handles: list = []
        self._not_causal: dict[str, Any] = {}  # layers left out of a forward as non-causal
        self._hook()

    def _hook(self) -> None:
        self._handles = hook_operators(self.modules, self._on_forward, active=self._capture_now,
                                       replay=self._on_recompute, reentrant_error=_REENTRANT,
                                       on_not_causal=self._left_out)
        self._handles.append(self.model.register_forward_pre_hook(_StartForward(self), with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(_EndForward(self), always_call=True))

    # -- schedule ------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The hyper-parameters as plain data (callables by their repr, tensors as lists)."""
        splits = self.splits.tolist() if isinstance(self.splits, torch.Tensor) else self.splits
        options = {"weight": self.weight, "kind": self.kind, "target": self.target,
                "normalize": self.normalize, "modules": list(self.modules), "splits": splits,
                "schedule": self.schedule, "total_steps": self.total_steps,
                "accumulation_steps": self.accumulation_steps,
                "every_n_steps": self.every_n_steps, "warmup_steps": self.warmup_steps,
                "dtype": str(self.dtype), "tol": self.tol, "temperature": self.temperature,
                "max_operators": self.max_operators}
        return {key: _plain(value) for key, value in options.items()}

    def factor(self, step: int | None = None) -> float:
        """The schedule's factor of the weight at ``step`` (default: the current step)."""
        step = self.step_count if step is None else step
        return check_factor(self._factor(step), step)

    def is_active(self, step: int | None = None) -> bool:
        """Whether the penalty is computed at ``step`` (default: the current step)."""
        step = self.step_count if step is None else step
        return (step >= self.warmup_steps and (step - self.warmup_steps) % self.every_n_steps == 0
                and self.factor(step) > 0)

    def advance(self) -> None:
        """Move the schedule to the next step (``reg()`` and ``ESSOptimizer.step`` call this)."""
        if self._attached:
            terms, self._step_terms = self._step_terms, []
            self._last_penalty = (torch.stack([t.to(terms[0].device) for t in terms]).sum() if terms
                                  else torch.zeros((), device=self._device()))
        self.step_count += 1

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position and the split sampler's RNG (tensors and ints: loads with
        ``torch.load(..., weights_only=True)``); restore with :meth:`load_state_dict`."""
        return {"step_count": self.step_count, "generator_state": self.generator.get_state(),
                "micro_steps": self._micro_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the schedule and the split sampling where :meth:`state_dict` left them."""
        if not isinstance(state, dict) or not {"step_count", "generator_state"} <= set(state):
            raise ValueError("state must be a dict from ESSRegularizer.state_dict() (keys step_count, "
                             f"generator_state), got {type(state).__name__}")
        self.step_count = int(state["step_count"])
        self.generator.set_state(state["generator_state"])
        self._micro_steps = int(state.get("micro_steps", 0))
        self._split_step = -1

    @property
    def last_penalty(self) -> torch.Tensor | None:
        """The penalty of the last completed (optimizer) step: a detached scalar on the model's
        device (zero on steps the schedule skips), None before the first; under gradient
        accumulation the mean over the step's micro-batches, in both modes. Reading it as a float
        synchronises with the device, so loggers read it at their own cadence."""
        return self._last_penalty

    def _capture_now(self) -> bool:
        return self._any_weight() and torch.is_grad_enabled() and self.is_active()

    def _any_weight(self) -> bool:
        return any(w != 0 for w in self.layer_weights.values())

    # -- penalty --------------------------------------------------------------------------------
    def __call__(self, splits: Any = None) -> torch.Tensor:
        """The penalty for the last forward (a scalar on the model's device); advances the schedule.

        ``splits``: a ``[B, S]`` (or ``[S]``) index tensor: measure the last forward there instead.
        A call that raises leaves the schedule and the captured operators as they were."""
        if self._attached:
            raise RuntimeError(
                "this ESSRegularizer is attached: its gradient is applied inside loss.backward(); "
                "do not also add reg() to the loss (call detach() to use it as a loss term)"
            )
        if not self._any_weight() or not self.is_active():
            penalty = torch.zeros((), device=self._device())
        else:
            penalty = self._penalty_of_last_forward(splits)
        self._micro_steps += 1
        self._micro_sum = penalty.detach() / self.accumulation_steps + (
            0 if self._micro_sum is None else self._micro_sum.to(penalty.device))
        if self._micro_steps >= self.accumulation_steps:  # the optimizer step is complete
            self._last_penalty, self._micro_sum, self._micro_steps = self._micro_sum, None, 0
            self.advance()
        return penalty

    def _penalty_of_last_forward(self, splits: Any) -> torch.Tensor:
        if not self._handles:
            raise RuntimeError(
                "this ESSRegularizer's hooks were removed (remove() or the end of its with-block), "
                "so it has nothing to penalize; create a new one, or call attach() to hook the "
                "model again")
        if not self._pending and self._not_causal:
            raise RuntimeError(
                f"reg() found no operator: every regularized layer computed a non-causal operator "
                f"in the last forward ({', '.join(map(repr, self._not_causal))}: "
                f"{next(iter(self._not_causal.values()))}); pass a causal mask, or leave these "
                "layers out with modules=")
        if not self._pending:
            raise RuntimeError(
                "reg() found no operator from a forward since the last reg(): call it after the "
                "model's forward, with gradients enabled (under torch.no_grad() or reentrant "
                "activation checkpointing (use_reentrant=True) the hooks see no graph and capture "
                "nothing; use use_reentrant=False)")
        if splits is not None:  # checked before anything is consumed
            for ops in self._pending.values():
                for op, *_ in ops:
                    batch_splits(splits, op.seq_len)
        pending = self._pending
        layers = len(pending)
        terms = [self._pending_term(name, op, 1.0 / (layers * len(ops)), at if splits is None else splits,
                                    token in self._backwarded)
                 for name, ops in pending.items() for op, at, token in ops]
        self._pending, self._not_causal, self._backwarded = {}, {}, set()
        for name, ops in pending.items():
            self.operators[name] = _detached(ops[-1][0])
        return torch.stack([t.to(terms[0].device) for t in terms]).sum()

    def _pending_term(self, name: str, op: Operator, share: float, splits: Any,
                      backwarded: bool) -> torch.Tensor:
        """A pending forward's term; one whose graph a backward already consumed counts its value
        only (a detached term: nothing can be differentiated through a freed graph)."""
        if not backwarded:
            return self._layer_term(name, op, share, splits)
        with torch.no_grad():
            return self._layer_term(name, _detached(op), share, splits)

    def _layer_term(self, name: str, op: Operator, share: float, splits: Any = None) -> torch.Tensor:
        if op.seq_len < 2:
            raise ValueError(f"layer {name!r} saw sequences of length {op.seq_len}: a split needs L >= 2 "
                             "(the ESS penalty measures memory carried from one position to a later one)")
        sampled = self._sample(name, op, splits)
        value = self.utilization(op, splits) if sampled is None else self._utilization(*sampled, splits)
        self.values[name] = value.detach()
        term = target_term(self.layer_targets[name], value, self.normalize)
        return self.layer_weights[name] * self.factor() * share * term

    def utilization(self, op: Operator, splits: Any = None) -> torch.Tensor:
        """``v``: ESS (or ESS / TSS when normalizing) averaged over this step's splits, channels
        and batch; differentiable. ``splits``: per-example ``[B, S]`` (or ``[S]``) indices instead."""
        return self._utilization(op, None, splits)

    def _sample(self, name: str, op: Operator, splits: Any
                ) -> tuple[Operator, tuple[torch.Tensor, int] | None] | None:
        """``max_operators`` of ``op``'s operators for this step (None: all count)."""
        option = self.max_operators
        if option is None or (option == "auto" and not is_linear(self.layer_targets[name])):
            return None  # "auto" leaves non-linear targets exact: f(mean of a sample) would be biased
        count = operator_count(option, op, self._split_count(op.seq_len, splits))
        if count is None:
            return None
        # a function of (seed, step, layer) only: both modes, any visiting order and a resumed run
        # draw the same operators, and the split sampler's stream is left alone
        generator = layer_generator(self.generator.initial_seed(), self.step_count, name)
        return sample_operators(op, count, generator)

    def _split_count(self, seq_len: int, splits: Any) -> int:
        """Splits per operator this step (for the cost of ``max_operators="auto"``)."""
        if splits is not None:  # this forward's indices: every operator is measured at their union
            return torch.unique(torch.as_tensor(splits).cpu()).numel()
        if isinstance(self.splits, int):
            return min(self.splits, seq_len - 1)
        if isinstance(self.splits, torch.Tensor):
            return self.splits.numel()
        return seq_len - 1

    def _utilization(self, op: Operator, rows: tuple[torch.Tensor, int] | None, splits: Any) -> torch.Tensor:
        """:meth:`utilization` of a sampled operator ``[K]`` whose rows come from the batch elements
        ``rows = (batch_index [K], batch)`` (None: ``op`` is the layer's whole operator, or a
        sample of an operator without a batch dimension)."""
        if splits is None:
            index, per_example = self._splits_for(op.seq_len), None
        else:
            per_example = batch_splits(splits, op.seq_len)
            index = torch.unique(per_example.cpu())  # sorted union of the batch's splits
        sigma = split_spectrum(op, splits=index, dtype=self.dtype).values
        ess = entropy_ess(sigma) if self.kind == "entropy" else self._soft_count(sigma)
        if self.normalize:
            ess = ess / split_capacity(op, index).to(ess.device, ess.dtype)
        if per_example is None:
            return ess.mean()
        if rows is not None:
            return sampled_batch_mean(ess, per_example, index, *rows)
        return batch_mean(ess, per_example, index, batched=len(op.shape) > 1)

    def _soft_count(self, sigma: torch.Tensor) -> torch.Tensor:
        top = sigma[..., :1]
        tiny = torch.finfo(sigma.dtype).tiny
        present = sigma > 0
        ratio = torch.where(present, sigma / top.clamp_min(tiny), 1)
        soft = torch.sigmoid((torch.log(ratio) - math.log(self.tol)) / self.temperature)
        return _keep_nan(torch.where(present, soft, 0).sum(-1), sigma)

    def _splits_for(self, seq_len: int) -> torch.Tensor:
        if self.splits is None or callable(self.splits):  # a callable without a forward: all splits
            return torch.arange(1, seq_len)
        if not isinstance(self.splits, int):
            if int(self.splits.max()) > seq_len - 1:
                raise ValueError(f"fixed splits go up to {int(self.splits.max())} but L = {seq_len}")
            return self.splits
        if self._split_step != self.step_count:
            self._split_cache, self._split_step = {}, self.step_count
        if seq_len not in self._split_cache:
            count = min(self.splits, seq_len - 1)
            draw = torch.randperm(seq_len - 1, generator=self.generator)[:count] + 1
            self._split_cache[seq_len] = draw.sort().values
        return self._split_cache[seq_len]

    # -- hooks and modes ---------------------------------------------------------------------------
    def _on_forward(self, name: str, module: nn.Module, op: Operator, output: Any) -> Any:
        calls = self._calls
        calls[name] = calls.get(name, 0) + 1
        at = self._forward_splits
        if not self._attached or _carrier(output) is None:
            self.operators[name] = op
            token = object()
            self._pending.setdefault(name, []).append((op, at, token))
            self._forward_tokens.add(token)
            # the layer's output lies on the loss's path (an operator tensor may not, or be a leaf)
            anchor = output if isinstance(output, torch.Tensor) and output.requires_grad else next(
                (t for t in op.tensors() if t.requires_grad and t.grad_fn is not None), None)
            if anchor is not None:  # a backward through this forward without reg(): forget it
                anchor.register_hook(_Forget(self, token))
            return None
        self.operators[name] = _detached(op)  # the injection node holds the graph until backward
        tensors = op.tensors()

        def penalty(leaves: list[torch.Tensor]) -> torch.Tensor:
            # read at backward time, when the forward has counted every layer and call: a layer
            # called twice counts half per call, so attached and loss-term modes agree
            share = 1.0 / (len(calls) * calls[name] * self.accumulation_steps)
            term = self._layer_term(name, op.rebuild(leaves), share, at)
            self._step_terms.append(term.detach())
            return term

        return _with_carrier(output, _InjectPenalty.apply(penalty, self, _carrier(output), *tensors))

    def _left_out(self, name: str, error: Exception) -> None:
        self._not_causal[name] = error

    def _on_recompute(self, name: str, module: nn.Module, op: Operator, output: Any) -> Any:
        """Activation checkpointing recomputes a layer inside backward: in attached mode the
        recomputed forward must save what the original saved (its penalty was counted already)."""
        if not self._attached or _carrier(output) is None:
            return None
        return _with_carrier(output, _InjectPenalty.apply(_no_penalty, self, _carrier(output), *op.tensors()))

    def attach(self, grad_scaler: Any = None) -> ESSRegularizer:
        """Backward-pass mode: the penalty's gradient is added inside ``loss.backward()``.

        Each recognised mixer's output passes an identity autograd node that holds the operator's
        tensors; its backward builds the penalty on the tensors' own device and adds its gradient.
        The forward keeps no penalty graph. With ``torch.amp.GradScaler`` pass the scaler so the
        injected gradient is scaled like the loss. The schedule is advanced by :meth:`advance`
        (``ESSOptimizer`` does it on every step).
        """
        self._attached, self._grad_scaler = True, grad_scaler
        if not self._handles:  # hooked again after remove()
            self._hook()
        return self

    def detach(self) -> ESSRegularizer:
        """Back to loss-term mode (``loss + reg()``)."""
        self._attached, self._grad_scaler = False, None
        return self

    @property
    def attached(self) -> bool:
        return self._attached

    def _grad_scale(self) -> float | torch.Tensor:
        """The loss scale of the GradScaler: its device tensor when it has one (reading it as a
        float would make the backward pass wait for the device), else a float."""
        scaler = self._grad_scaler
        if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
            return 1.0
        scale = getattr(scaler, "_get_scale_async", lambda: None)()
        return float(scaler.get_scale()) if scale is None else scale

    def remove(self) -> None:
        """Remove all hooks and drop kept operators."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.operators, self._pending, self._backwarded = [], {}, {}, set()

    def __enter__(self) -> ESSRegularizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def __getstate__(self) -> dict[str, Any]:
        """Pickles with its model and hooks (the hooks are picklable objects), not the kept
        operators or a grad scaler."""
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("operators", "generator", "_grad_scaler", "_split_cache", "_pending", "_calls",
                              "_step_terms", "_last_penalty", "_micro_sum", "_not_causal", "_backwarded",
                              "_forward_tokens")}
        _require_picklable(self)
        state["generator_state"] = self.generator.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator_state = state.pop("generator_state")
        self.__dict__.update(state)
        self.generator = torch.Generator()
        self.generator.set_state(generator_state)
        self.operators, self._grad_scaler, self._split_cache = {}, None, {}
        self._pending, self._calls, self._step_terms, self._last_penalty = {}, {}, [], None
        self._backwarded, self._forward_tokens = set(), set()
        self._micro_sum, self._not_causal = None, {}

    def __repr__(self) -> str:
        mode = "attached" if self._attached else "loss-term"
        return (f"ESSRegularizer(weight={self.weight}, kind={self.kind!r}, target={self.target!r}, "
                f"layers={len(self.modules)}, mode={mode}, step={self.step_count})")


class _StartForward:
    """Model pre-forward hook: a new forward starts counting layer calls afresh (picklable)."""

    def __init__(self, regularizer: ESSRegularizer) -> None:
        self.regularizer = regularizer

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if recomputing():  # a checkpointed model recomputed in backward is not a new forward
            return
        reg = self.regularizer
        reg._calls = {}
        reg._forward_tokens = set()
        if reg._backwarded and reg._capture_now():  # forwards already backwarded without reg()
            done = reg._backwarded
            pending = {name: [e for e in ops if e[2] not in done] for name, ops in reg._pending.items()}
            reg._pending = {name: ops for name, ops in pending.items() if ops}
            reg._backwarded = set()
        if callable(reg.splits) and reg._capture_now():
            first = args[0] if args else kwargs.get("input_ids", next(iter(kwargs.values()), None))
            splits = reg.splits(first)
            if splits is None:
                raise ValueError("splits gave None; a splits callable must return a [B, S] (or [S]) "
                                 "index tensor for the batch")
            reg._forward_splits = splits

    def __deepcopy__(self, memo: dict) -> _InertHook:
        return _InertHook()


class _EndForward:
    """Model forward hook, also called when the forward raises (``always_call``): a forward that
    failed part-way (an out-of-memory error, a bad batch) leaves nothing pending, so its layers'
    graphs are freed and the next ``reg()`` sees only complete forwards (picklable)."""

    def __init__(self, regularizer: ESSRegularizer) -> None:
        self.regularizer = regularizer

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if output is not None or sys.exc_info()[1] is None or recomputing():
            return  # a forward that returned (or one recomputed inside backward)
        reg = self.regularizer
        failed, reg._forward_tokens = reg._forward_tokens, set()
        if not failed:
            return
        kept = {name: [e for e in ops if e[2] not in failed] for name, ops in reg._pending.items()}
        for name, ops in reg._pending.items():
            if ops and ops[-1][2] in failed:
                reg.operators[name] = _detached(ops[-1][0])  # logging keeps no graph either
        reg._pending = {name: ops for name, ops in kept.items() if ops}

    def __deepcopy__(self, memo: dict) -> _InertHook:
        return _InertHook()


class _Forget:
    """Tensor hook on a captured operator: a backward passed through its forward. If ``reg()`` has
    not taken that forward's operators yet (a step without the penalty), the next forward that
    captures drops them, with the graph they hold; until then ``reg()`` can still read them.
    Holds a weak reference and a token, so it keeps nothing alive."""

    def __init__(self, regularizer: ESSRegularizer, token: object) -> None:
        self.regularizer, self.token = weakref.ref(regularizer), token

    def __call__(self, grad: torch.Tensor) -> None:
        reg = self.regularizer()
        if reg is not None:
            reg._backwarded.add(self.token)


class _InertHook:
    """What a deep copy of a hooked model gets instead of the regularizer's hook."""

    def __call__(self, *args: Any) -> None:
        return None


_REENTRANT = (
    "the ESS penalty cannot see this layer: it runs under reentrant activation checkpointing "
    "(torch.utils.checkpoint(..., use_reentrant=True), or a model's gradient_checkpointing_enable() "
    "with use_reentrant=True), whose forward runs without gradients. Use use_reentrant=False "
    "(e.g. gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))")


def _plain(value: Any) -> Any:
    """A config value as plain data: callables by their repr, tensors as lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if callable(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _require_picklable(reg: ESSRegularizer) -> None:
    """Name the option that keeps a regularizer (and the model it hooks) from pickling."""
    import pickle

    for option in ("weight", "target", "splits", "schedule"):
        value = getattr(reg, option)
        if callable(value) and not isinstance(value, torch.Tensor):
            try:
                pickle.dumps(value)
            except Exception:  # lambdas, local functions, closures
                raise TypeError(
                    f"ESSRegularizer cannot be pickled (nor the model it hooks): its {option}= is "
                    f"{value!r}, which pickle cannot save; use a module-level function or a class "
                    "such as ess_reg.tasks.BoundarySplits, or reg.remove() before saving the model"
                ) from None


def _no_penalty(leaves: list[torch.Tensor]) -> torch.Tensor:
    """A zero connected to ``leaves`` (the recomputed injection nodes' backward never adds anything)."""
    return sum(leaf.real.sum() * 0 for leaf in leaves if leaf.requires_grad)


def _detached(op: Operator) -> Operator:
    """``op`` over detached tensors (kept for logging; holds no autograd graph), if it can be rebuilt."""
    try:
        return op.rebuild([t.detach() for t in op.tensors()])
    except NotImplementedError:
        return op


def _check_config(kind, splits, every_n_steps, warmup_steps, dtype, tol, temperature):
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if callable(splits) and not isinstance(splits, torch.Tensor):
        return _check_rest(every_n_steps, warmup_steps, dtype, tol, temperature)
    if isinstance(splits, bool) or (isinstance(splits, int) and splits < 1):
        raise ValueError(f"splits must be None (all), a positive int or split indices, got {splits!r}")
    if splits is not None and not isinstance(splits, int):
        index = torch.as_tensor(splits)
        if index.dim() != 1 or index.numel() == 0 or index.is_floating_point() or int(index.min()) < 1:
            raise ValueError(f"fixed splits must be a non-empty 1-D list of indices >= 1, got {splits!r}")
    _check_rest(every_n_steps, warmup_steps, dtype, tol, temperature)


def _check_rest(every_n_steps, warmup_steps, dtype, tol, temperature):
    for name, value, low in (("every_n_steps", every_n_steps, 1), ("warmup_steps", warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not (0 < tol < 1):
        raise ValueError(f"tol must lie in (0, 1), got {tol}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _carrier(output: Any) -> torch.Tensor | None:
    """The tensor an attached penalty rides on: the output, or the first element of a plain tuple
    output (attention modules return ``(attn_output, attn_weights)``); None when there is none."""
    if isinstance(output, torch.Tensor):
        return output
    if type(output) is tuple and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _with_carrier(output: Any, carrier: torch.Tensor) -> Any:
    """``output`` with its carrier replaced by ``carrier``."""
    return carrier if isinstance(output, torch.Tensor) else (carrier, *output[1:])
