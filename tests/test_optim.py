"""ESSOptimizer: the wrapper contract, schedulers, Lookahead, GradScaler, Lightning's protocol."""

from __future__ import annotations

import copy

import pytest
import torch
from pytorch_optimizer import Lookahead

from ess_reg import ESSOptimizer, ESSRegularizer
from ess_reg.models import SequenceModel


def _setup(seed=0, **reg_kwargs):
    torch.manual_seed(seed)
    model = SequenceModel("gla", d_model=16, n_layers=1, vocab_size=30)
    reg = ESSRegularizer(model, weight=0.5, splits=[3, 7, 11], **reg_kwargs)
    return model, reg


IDS = torch.randint(0, 30, (4, 16), generator=torch.Generator().manual_seed(3))


def _loss(model):
    return model(IDS).pow(2).mean()


@pytest.mark.parametrize("how", ["instance", "class", "name"])
def test_construction_and_proxies(how):
    model, reg = _setup()
    if how == "instance":
        opt = ESSOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), reg)
    elif how == "class":
        opt = ESSOptimizer(torch.optim.AdamW, reg, params=model.parameters(), lr=1e-3)
    else:
        opt = ESSOptimizer("adamw", reg, params=model.parameters(), lr=1e-3)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state and opt.defaults is opt.optimizer.defaults
    assert reg.attached and str(opt).lower() == "essoptimizer"
    with pytest.raises(ValueError, match="params"):
        ESSOptimizer(torch.optim.AdamW, reg)
    with pytest.raises(TypeError, match="ESSRegularizer"):
        ESSOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), object())


def test_plain_loop_applies_the_penalty_and_matches_manual_loss_term():
    model, reg = _setup()
    manual_model = copy.deepcopy(model)
    manual_reg = ESSRegularizer(manual_model, weight=0.5, splits=[3, 7, 11])
    opt = ESSOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg)
    manual_opt = torch.optim.SGD(manual_model.parameters(), lr=0.1)
    for _ in range(3):
        _loss(model).backward()
        opt.step()
        opt.zero_grad()
        (_loss(manual_model) + manual_reg()).backward()
        manual_opt.step()
        manual_opt.zero_grad()
    for p, q in zip(model.parameters(), manual_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert reg.step_count == 3


def test_step_with_closure_and_schedule():
    model, reg = _setup(every_n_steps=2)
    opt = ESSOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg)

    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        return loss

    losses = [opt.step(closure) for _ in range(4)]
    assert all(torch.is_tensor(loss) for loss in losses) and reg.step_count == 4


def test_lr_scheduler_and_state_dict_round_trip():
    model, reg = _setup()
    opt = ESSOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), reg)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        _loss(model).backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    state = opt.state_dict()
    assert set(state) == {"base_optimizer", "ess"} and state["ess"]["step_count"] == 2
    other_model, other_reg = _setup(seed=1)
    other = ESSOptimizer(torch.optim.AdamW(other_model.parameters(), lr=1.0), other_reg)
    other.load_state_dict(state)
    assert other_reg.step_count == 2 and other.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    assert torch.equal(other_reg.generator.get_state(), reg.generator.get_state())
    with pytest.raises(ValueError, match="ESSOptimizer state dict"):
        other.load_state_dict(state["base_optimizer"])


def test_add_param_group_and_zero_grad():
    model, reg = _setup()
    extra = torch.nn.Parameter(torch.zeros(3))
    opt = ESSOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg)
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(opt.param_groups) == 2
    _loss(model).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("order", ["lookahead_outside", "lookahead_inside"])
def test_lookahead_in_both_nesting_orders(order):
    model, reg = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    if order == "lookahead_outside":
        opt = Lookahead(ESSOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg), k=2)
    else:
        opt = ESSOptimizer(Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=2), reg)
    for _ in range(4):
        _loss(model).backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert reg.step_count == 4
    opt.load_state_dict(opt.state_dict())


def test_grad_scaler_scales_the_injected_gradient():
    model, reg = _setup()
    reference = copy.deepcopy(model)
    reference_reg = ESSRegularizer(reference, weight=0.5, splits=[3, 7, 11])
    (_loss(reference) + reference_reg()).backward()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = ESSOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg, grad_scaler=scaler)
    scaler.scale(_loss(model)).backward()
    scaler.unscale_(opt)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    scaler.step(opt)
    scaler.update()
    assert reg.step_count == 1


def test_satisfies_lightnings_optimizable_protocol():
    from lightning.fabric.utilities.types import Optimizable

    model, reg = _setup()
    assert isinstance(ESSOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg), Optimizable)
