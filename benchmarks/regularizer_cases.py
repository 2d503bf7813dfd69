"""The models the regularizer's cost is measured on (shared by bench_regularizer.py and gpu_check.py).

- ``gla``: the default MQAR model (GLA, ``d_model`` 64, 2 layers) at ``L = 256``, batch 32;
- ``attention``: the same with softmax attention;
- ``gla_wide``: GLA with 64 state dimensions per head (2 heads, ``d_model`` 64, 2 layers) at
  ``L = 64``, batch 64, the distillation study's teachers: a state as large as the sequence, so the
  penalty takes the dense route;
- ``mamba``: a transformers ``MambaForCausalLM`` built from a config (hidden 256, 4 layers,
  ``d_inner`` 512, state 16) at ``L = 512``, batch 4: ``d_inner x batch`` = 2048 operators a layer.

``small=True`` shrinks every case to a size a unit test runs in a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ess_reg import ESSRegularizer
from ess_reg.tasks import MQAR, loss_fn

CASES = ("gla", "attention", "gla_wide", "mamba")


@dataclass
class Case:
    """A model, one batch and the loss of one training step."""

    name: str
    model: torch.nn.Module
    inputs: torch.Tensor
    loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    description: str


def build(name: str, device: str | torch.device = "cpu", *, small: bool = False,
          dtype: torch.dtype = torch.float32) -> Case:
    """The case ``name`` on ``device`` (parameters in ``dtype``), seeded."""
    if name not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {name!r}")
    torch.manual_seed(0)
    if name == "mamba":
        from transformers import MambaConfig, MambaForCausalLM

        hidden, layers, length, batch, vocab = (32, 2, 32, 2, 64) if small else (256, 4, 512, 4, 512)
        config = MambaConfig(hidden_size=hidden, intermediate_size=2 * hidden, state_size=4 if small else 16,
                             num_hidden_layers=layers, vocab_size=vocab, use_cache=False)
        model = MambaForCausalLM(config)
        ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))

        def lm_loss(model, ids):
            return model(input_ids=ids, labels=ids).loss

        return Case(name, model.to(device, dtype), ids.to(device), lm_loss,
                    f"HF MambaForCausalLM hidden {hidden}, {layers} layers, d_inner {2 * hidden}, "
                    f"L={length}, batch {batch}")
    from ess_reg.models import SequenceModel

    mixer = "sa" if name == "attention" else "gla"
    d_model, length, batch, kv, vocab = (16, 32, 4, 4, 64) if small else (64, 256, 32, 16, 512)
    kwargs = {}
    if name == "gla_wide":
        length, batch, kv, vocab = (16, 4, 2, 64) if small else (64, 64, 8, 256)
        kwargs = {"num_heads": 2, "expand_k": 2.0}
    task = MQAR(batch, length, kv, vocab, seed=0)
    model = SequenceModel(mixer, d_model, 2, vocab, **kwargs)
    targets = task.targets.to(device)

    def mqar_loss(model, ids):
        return loss_fn(model(ids), targets)

    return Case(name, model.to(device, dtype), task.inputs.to(device), mqar_loss,
                f"{mixer.upper()} d_model {d_model}, 2 layers, L={length}, batch {batch}"
                + (f", 2 heads, state {d_model} per head" if name == "gla_wide" else ""))


def stepper(case: Case, mode: str, **reg_kwargs: Any) -> Callable[[], None]:
    """One training step of ``case`` with no regularizer (``"none"``), the regularizer as a loss
    term (``"loss"``) or attached (``"attach"``); defaults of ``ESSRegularizer`` unless given."""
    if mode not in ("none", "loss", "attach"):
        raise ValueError(f"mode must be none, loss or attach, got {mode!r}")
    model = case.model
    reg = None if mode == "none" else ESSRegularizer(model, **reg_kwargs)
    if mode == "attach":
        reg.attach()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = case.loss(model, case.inputs)
        if mode == "loss":
            loss = loss + reg()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if mode == "attach":
            reg.advance()

    step.regularizer = reg  # type: ignore[attr-defined]
    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(steppers: dict[str, Callable[[], None]], device: torch.device, rounds: int = 3,
               repeats: int = 2) -> dict[str, float]:
    """Seconds per step for each stepper: interleaved round by round, best round kept, so that the
    drifts of a noisy machine hit every mode alike. One warm-up step each first."""
    for step in steppers.values():
        step()
    best = {key: float("inf") for key in steppers}
    for _ in range(rounds):
        for key, step in steppers.items():
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            _synchronize(device)
            best[key] = min(best[key], (time.perf_counter() - start) / repeats)
    return best


def penalty_time(case: Case, rounds: int = 3, **reg_kwargs: Any) -> float:
    """Seconds of the penalty alone (forward and backward into the operators' tensors), the model's
    forward and backward excluded: what the regularizer adds on top of a fused GPU step.

    Each captured operator is rebuilt over detached copies of its tensors first: differentiating
    with respect to the captured tensors themselves would also run the model's backward between
    the layers (a later layer's operator depends on an earlier layer's), which a training step
    runs anyway and which is not the penalty's cost."""
    device = next(case.model.parameters()).device
    reg = ESSRegularizer(case.model, **reg_kwargs)
    best = float("inf")
    try:
        for _ in range(rounds + 1):
            case.loss(case.model, case.inputs)
            leaves = _detach_pending(reg)
            _synchronize(device)
            start = time.perf_counter()
            penalty = reg()
            torch.autograd.grad(penalty, leaves, allow_unused=True)
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
    finally:
        reg.remove()
    return best


def _detach_pending(reg: ESSRegularizer) -> list[torch.Tensor]:
    """Rebuild the operators ``reg`` captured in the last forward over detached leaves (the same
    values); returns the leaves that require gradients."""
    leaves: list[torch.Tensor] = []
    for name, ops in reg._pending.items():
        rebuilt = []
        for op, *rest in ops:
            tensors = [t.detach().requires_grad_(t.requires_grad) for t in op.tensors()]
            leaves += [t for t in tensors if t.requires_grad]
            rebuilt.append((op.rebuild(tensors), *rest))
        reg._pending[name] = rebuilt
    return leaves
