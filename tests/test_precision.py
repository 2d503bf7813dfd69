"""Mixed precision with the regularizer: bf16 autocast on CPU (loss-term and attached modes, the
reference GLA model and a Hugging Face Mamba), fp16 autocast with a ``torch.amp.GradScaler`` (CPU,
and CUDA where there is one).

The parameters stay float32; the operators' tensors are bf16 / fp16 (checked), and the spectrum is
computed in the regularizer's float64. Tolerances are stated with the deviations measured on this
CPU (torch 2.14), for the fixed seeds used here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ess_reg import ESSOptimizer, ESSRegularizer
from ess_reg.models import SequenceModel

VOCAB, WEIGHT = 40, 0.5
SPLITS = [3, 7, 11, 17]
IDS = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
TARGETS = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
MODES = ["loss_term", "attached"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gla(device: str = "cpu") -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel("gla", d_model=32, n_layers=2, vocab_size=VOCAB).to(device)


def _gla_loss(model: torch.nn.Module) -> torch.Tensor:
    logits = model(IDS.to(next(model.parameters()).device))
    return F.cross_entropy(logits.float().flatten(0, 1), TARGETS.to(logits.device).flatten())


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double().cpu()
                      for p in model.parameters()])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def _penalty_from_values(reg: ESSRegularizer) -> torch.Tensor:
    """weight * mean over layers of (1 - utilization): the attached-mode penalty of the last backward
    (target "max", normalized, each layer called once)."""
    values = list(reg.values.values())
    return reg.weight * sum(1 - v for v in values) / len(values)


def _bf16_run(build, task_loss, mode: str, dtype: torch.dtype | None, *, penalty_only: bool = False):
    """One forward under CPU autocast (``dtype=None``: float32, no autocast), one backward (of the
    penalty alone with ``penalty_only``), one AdamW step."""
    model = build()
    reg = ESSRegularizer(model, weight=WEIGHT, splits=SPLITS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if mode == "attached":
        opt = ESSOptimizer(opt, reg)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        task = task_loss(model)
        penalty = reg() if mode == "loss_term" else None
    if mode == "loss_term":
        (penalty if penalty_only else task + penalty).backward()
        penalty = penalty.detach()
    else:  # the injected gradient only, when the task's is zero
        (task * 0 if penalty_only else task).backward()
        penalty = _penalty_from_values(reg)
    dtypes = {name: {t.dtype for t in op.tensors()} for name, op in reg.operators.items()}
    grads = _grads(model)
    opt.step()
    finite_params = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"penalty": penalty, "grads": grads, "dtypes": dtypes, "finite_params": finite_params,
            "step_count": reg.step_count}


def _check_bf16_against_float32(build, task_loss, mode: str, *, rel: float, full_cos: float,
                                penalty_cos: float) -> dict[str, float]:
    single, half = (_bf16_run(build, task_loss, mode, d) for d in (None, torch.bfloat16))
    assert half["dtypes"].keys() == single["dtypes"].keys() and half["dtypes"]
    assert all(torch.bfloat16 in dtypes for dtypes in half["dtypes"].values()), half["dtypes"]
    assert all(dtypes == {torch.float32} for dtypes in single["dtypes"].values()), single["dtypes"]
    for run in (single, half):
        assert torch.isfinite(run["penalty"]) and bool(torch.isfinite(run["grads"]).all())
        assert run["finite_params"] and run["step_count"] == 1
    measured = {"rel": float(abs(half["penalty"] - single["penalty"]) / abs(single["penalty"])),
                "full_cos": _cosine(half["grads"], single["grads"])}
    only_single, only_half = (_bf16_run(build, task_loss, mode, d, penalty_only=True)
                              for d in (None, torch.bfloat16))
    assert bool(torch.isfinite(only_half["grads"]).all()) and only_half["grads"].norm() > 0
    measured["penalty_cos"] = _cosine(only_half["grads"], only_single["grads"])
    assert measured["rel"] < rel, measured
    assert measured["full_cos"] > full_cos, measured
    assert measured["penalty_cos"] > penalty_cos, measured
    return measured


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_gla_is_close_to_float32(mode):
    # measured (both modes alike): penalty relative deviation 4.2e-4, cosine of the whole gradient
    # 0.9981, of the penalty's gradient alone 0.9995; over 12 other seeds of model and data (k = 8
    # random splits): deviation at most 7.5e-4, penalty-gradient cosine at least 0.949
    _check_bf16_against_float32(_gla, _gla_loss, mode, rel=1e-2, full_cos=0.99, penalty_cos=0.98)


def _hf_mamba() -> torch.nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=1,
                                        vocab_size=32, expand=2))


def _hf_mamba_loss(model: torch.nn.Module) -> torch.Tensor:
    ids = IDS[:2, :20] % 32
    return model(ids, labels=ids).loss


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_hf_mamba_is_finite_and_close_to_float32(mode, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("transformers")
    # measured (both modes alike): penalty relative deviation 6.0e-4, cosine of the whole gradient
    # 0.9986, of the penalty's gradient alone 0.9967
    measured = _check_bf16_against_float32(_hf_mamba, _hf_mamba_loss, mode, rel=1e-2, full_cos=0.99,
                                           penalty_cos=0.98)
    assert measured["rel"] > 0  # bf16 did change something (the operator's C is bf16)


# -- fp16 with a GradScaler -------------------------------------------------------------------------


def _require_fp16_autocast(device: str) -> None:
    try:
        with torch.autocast(device, dtype=torch.float16):
            out = torch.nn.Linear(2, 2).to(device)(torch.ones(1, 2, device=device))
    except (RuntimeError, ValueError) as error:  # pragma: no cover - depends on the torch build
        pytest.skip(f"fp16 autocast is not supported on {device}: {error}")
    if out.dtype != torch.float16:  # pragma: no cover
        pytest.skip(f"fp16 autocast on {device} leaves Linear in {out.dtype}")


def test_fp16_autocast_gla_gradients_are_finite_without_the_regularizer():
    _require_fp16_autocast("cpu")
    model = _gla()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = _gla_loss(model)
    loss.backward()
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p.grad).all())]
    assert not bad, f"non-finite gradients: {bad}"


def _fp16_grads(device: str, *, fp16: bool, mode: str = "attached", weight: float = WEIGHT,
                scale: float = 2.0 ** 10, pass_scaler: bool = True,
                penalty_only: bool = False) -> torch.Tensor:
    """The gradient of one backward under a GradScaler, unscaled (``fp16=False``: float32, no
    autocast, scaler disabled)."""
    model = _gla(device)
    reg = ESSRegularizer(model, weight=weight, splits=SPLITS)
    scaler = torch.amp.GradScaler(device, init_scale=scale, enabled=fp16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if mode == "attached":
        opt = ESSOptimizer(opt, reg, grad_scaler=scaler if pass_scaler else None)
    with torch.autocast(device, dtype=torch.float16, enabled=fp16):
        task = _gla_loss(model)
        penalty = reg() if mode == "loss_term" else 0
    if fp16 and mode == "attached":
        assert all(torch.float16 in {t.dtype for t in op.tensors()} for op in reg.operators.values())
    scaler.scale((task * 0 if penalty_only else task) + penalty).backward()
    if fp16:
        scaler.unscale_(opt)
    return _grads(model)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_fp16_grad_scaler_attached_mode(device):
    _require_fp16_autocast(device)
    scale = 2.0 ** 10
    # the injected gradient is scaled like the loss: after unscale_ it is the float32 one (measured on
    # CPU: cosine 0.99999, norm ratio 1.0014; the whole gradient: cosine 0.99978)
    reference = _fp16_grads(device, fp16=False, penalty_only=True)
    injected = _fp16_grads(device, fp16=True, scale=scale, penalty_only=True)
    assert bool(torch.isfinite(injected).all())
    assert _cosine(injected, reference) > 0.999
    assert float(injected.norm() / reference.norm()) == pytest.approx(1, rel=2e-2)
    whole = _fp16_grads(device, fp16=True, scale=scale)
    assert _cosine(whole, _fp16_grads(device, fp16=False)) > 0.999
    # without the scaler handed to ESSOptimizer the injected gradient is not scaled, and unscale_
    # divides it by the scale
    unscaled = _fp16_grads(device, fp16=True, scale=scale, penalty_only=True, pass_scaler=False)
    assert float(unscaled.norm() / reference.norm()) == pytest.approx(1 / scale, rel=2e-2)

    # three steps through scaler.step(opt): every step taken (the scale never backs off), parameters
    # finite. (The fp16 trajectory itself drifts from float32 within 3 SGD steps, with or without
    # the regularizer - measured parameter error 0.03 to 0.8 of the update, by learning rate - so
    # it is not compared.)
    model = _gla(device)
    reg = ESSRegularizer(model, weight=WEIGHT, splits=SPLITS)
    scaler = torch.amp.GradScaler(device, init_scale=scale)
    opt = ESSOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg, grad_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        with torch.autocast(device, dtype=torch.float16):
            loss = _gla_loss(model)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert reg.step_count == 3 and scaler.get_scale() == scale
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_fp16_injected_gradient_is_scaled_before_it_reaches_fp16():
    _require_fp16_autocast("cpu")
    weight, scale = 1e-5, 2.0 ** 12
    reference = _fp16_grads("cpu", fp16=False, weight=weight, penalty_only=True)
    loss_term = _fp16_grads("cpu", fp16=True, mode="loss_term", weight=weight, scale=scale,
                            penalty_only=True)
    attached = _fp16_grads("cpu", fp16=True, weight=weight, scale=scale, penalty_only=True)
    # measured: loss term 0.99998 (norm ratio 1.0015); attached 0.368 (norm ratio 0.445), 0.99998
    # with the fix; at weight 1e-7 the attached gradient is all zero (loss term: cosine 0.92)
    assert _cosine(loss_term, reference) > 0.999
    assert _cosine(attached, reference) > 0.999
    assert float(attached.norm() / reference.norm()) == pytest.approx(1, rel=2e-2)
