"""The regularizer in ordinary training loops: model copies (EMA, SWA), in-place ops on outputs,
layers called twice, custom operators, misuse errors, closures (LBFGS), pickling, checkpointing."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ess_reg import DenseOperator, ESSOptimizer, ESSRegularizer, Operator, register_extractor
from ess_reg.mixers import GatedLinearAttention
from ess_reg.models import SequenceModel

VOCAB = 40


def _model(seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    return SequenceModel("gla", d_model=32, n_layers=2, vocab_size=VOCAB).double()


def _ids(seed: int = 1, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, length), generator=torch.Generator().manual_seed(seed))


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).square().mean()


def _graph_tensors(module: nn.Module) -> list[str]:
    """Attributes of any submodule that hold a tensor attached to an autograd graph."""
    found = []
    for name, sub in module.named_modules():
        for key, value in vars(sub).items():
            values = value.values() if isinstance(value, dict) else [value]
            for item in values:
                if isinstance(item, torch.Tensor) and item.grad_fn is not None:
                    found.append(f"{name}.{key}")
                if isinstance(item, Operator) and any(t.grad_fn is not None for t in item.tensors()):
                    found.append(f"{name}.{key}")
    return found


@pytest.mark.parametrize("kind", ["gla", "hf_mamba"])
@pytest.mark.parametrize("mode", ["loss_term", "attached"])
def test_copies_of_the_model_during_training(mode, kind):
    """deepcopy at any time, timm's ModelEmaV3 and torch's AveragedModel updated every step."""
    from timm.utils import ModelEmaV3
    from torch.optim.swa_utils import AveragedModel

    model, ids = (_model(), _ids()) if kind == "gla" else (_hf_mamba(), _ids(length=8))
    reg = ESSRegularizer(model, weight=0.1, splits=4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    if mode == "attached":
        opt = ESSOptimizer(opt, reg)
    ema, swa = ModelEmaV3(model, decay=0.9), AveragedModel(model)
    for _ in range(3):
        loss = _logits_loss(model, ids)
        assert not _graph_tensors(model)  # nothing the forward leaves on a module holds a graph
        copy.deepcopy(model)  # between forward and backward
        if mode == "loss_term":
            loss = loss + reg()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
        swa.update_parameters(model)
        assert not _graph_tensors(model)
    clone = copy.deepcopy(model)
    before = dict(reg.operators)
    clone(ids)  # the copy's hooks are inert: they neither capture nor copy the regularizer
    assert reg.operators.keys() == before.keys()
    assert all(reg.operators[k] is before[k] for k in before)
    assert not any(isinstance(v, ESSRegularizer) for v in vars(clone).values())


def test_attached_output_allows_in_place_ops():
    model, ids = _model(), _ids()
    ESSRegularizer(model, weight=0.1, splits=4).attach()
    mixer = model.blocks[0].mixer
    mixer.register_forward_hook(lambda module, args, output: output.mul_(1.0))
    _loss(model, ids).backward()
    assert all(p.grad is not None for p in mixer.parameters())


class _Twice(nn.Module):
    """One GLA mixer applied twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 32)
        self.mixer = GatedLinearAttention(32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.mixer(x + self.mixer(x))


def _penalty_grads(attached: bool) -> dict[str, torch.Tensor]:
    model = _Twice().double()
    reg = ESSRegularizer(model, weight=1.0, splits=[3, 7, 12])
    if attached:
        reg.attach()
    loss = 0 * model(_ids()).sum()
    if not attached:
        loss = loss + reg()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_a_layer_called_twice_is_penalised_alike_in_both_modes():
    loss_term, attached = _penalty_grads(False), _penalty_grads(True)
    assert loss_term.keys() == attached.keys()
    for name in loss_term:
        torch.testing.assert_close(attached[name], loss_term[name], rtol=1e-9, atol=1e-12)


class _MatrixOperator(DenseOperator):
    """A user-defined operator type (a thin subclass with its own rebuild)."""

    def rebuild(self, tensors):
        return _MatrixOperator(tensors[0], validate=False)


class _CausalMix(nn.Module):
    def __init__(self, length: int = 24) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(length, length, dtype=torch.float64))

    def matrix(self) -> torch.Tensor:
        mask = torch.ones_like(self.logits, dtype=torch.bool).tril()
        return self.logits.masked_fill(~mask, float("-inf")).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, L]
        return x @ self.matrix().T


def test_custom_operator_types_work_in_attached_mode():
    register_extractor(_CausalMix, lambda m, args, kwargs, out: _MatrixOperator(m.matrix()[None]))
    torch.manual_seed(0)
    mix = _CausalMix()
    x = torch.randn(2, 24, dtype=torch.float64)
    reg = ESSRegularizer(mix, weight=1.0, splits=[5, 12])
    (mix(x).sum() * 0 + reg()).backward()
    expected = mix.logits.grad.clone()
    mix.logits.grad = None
    reg.attach()
    (mix(x).sum() * 0).backward()
    torch.testing.assert_close(mix.logits.grad, expected)


def test_misuse_is_an_error_not_a_silent_zero():
    model, ids = _model(), _ids()
    reg = ESSRegularizer(model, weight=0.1)
    with pytest.raises(RuntimeError, match="no operator"):
        reg()  # before any forward
    _loss(model, ids)
    reg()
    with pytest.raises(RuntimeError, match="no operator"):
        reg()  # twice for one forward
    reg.remove()
    _loss(model, ids)
    with pytest.raises(RuntimeError, match="removed"):
        reg()
    reg.attach()  # hooks the model again
    _loss(model, ids).backward()
    assert reg.operators


def test_steps_without_the_penalty_leave_nothing_behind():
    """A loop that adds reg() only on some steps: a forward whose backward ran without reg() is
    forgotten at the next forward (no 'backward through the graph a second time'), and the penalty
    equals that of a fresh regularizer on the same forward."""
    model, ids = _model(), _ids()
    reg = ESSRegularizer(model, weight=0.1, splits=[3, 9, 15])
    for step in range(4):
        loss = _loss(model, ids)
        if step % 2:
            penalty = reg()
            loss = loss + penalty
        loss.backward()
        if not step % 2:  # kept for a reg() after the backward, dropped by the next forward
            assert reg._pending and reg._backwarded and not _graph_tensors(model)
    fresh = ESSRegularizer(_model(), weight=0.1, splits=[3, 9, 15])
    _loss(fresh.model, ids)
    model.load_state_dict(fresh.model.state_dict())
    _loss(model, ids)
    torch.testing.assert_close(reg(), fresh(), rtol=1e-12, atol=0)
    with torch.no_grad():  # a forward that captures nothing keeps what the last one captured
        _loss(model, ids)
    assert reg._pending == {}
    _loss(model, ids)
    with torch.no_grad():
        _loss(model, ids)
    reg()


def test_several_forwards_before_one_reg_are_averaged():
    """Forwards not yet backwarded stay pending: reg() after two forwards is the mean of both."""
    model, a, b = _model(), _ids(1), _ids(2)
    reg = ESSRegularizer(model, weight=0.1, splits=[3, 9, 15])
    singles = []
    for ids in (a, b):
        _loss(model, ids)
        singles.append(reg())
    _loss(model, a)
    _loss(model, b)
    torch.testing.assert_close(reg(), (singles[0] + singles[1]) / 2, rtol=1e-12, atol=0)


def test_a_forward_that_captured_nothing_names_reentrant_checkpointing():
    """Reentrant activation checkpointing runs the forward without a graph, like torch.no_grad()."""
    model, ids = _model(), _ids()
    reg = ESSRegularizer(model, weight=1.0)
    x = model.embedding(ids)
    checkpoint(lambda h: model.blocks[1](model.blocks[0](h)), x, use_reentrant=True)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        reg()


class _Checkpointed(nn.Module):
    """A block run through torch.utils.checkpoint."""

    def __init__(self, block: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.inner, self.reentrant = block, reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, x, use_reentrant=self.reentrant)


def _checkpointed(model: SequenceModel, reentrant: bool, blocks=(0, 1)) -> SequenceModel:
    for index in blocks:
        model.blocks[index] = _Checkpointed(model.blocks[index], reentrant)
    return model


@pytest.mark.parametrize("mode", ["loss_term", "attached"])
def test_non_reentrant_checkpointing_keeps_penalty_and_gradients(mode):
    """Recomputation inside backward neither adds operators nor counts layers twice."""
    grads, values = {}, {}
    for wrapped in (False, True):
        model, ids = _model(), _ids()
        if wrapped:
            _checkpointed(model, reentrant=False)
        reg = ESSRegularizer(model, weight=1.0, splits=4)
        if mode == "attached":
            reg.attach()
        for _ in range(3):
            model.zero_grad()
            loss = _loss(model, ids)
            if mode == "loss_term":
                loss = loss + reg()
            loss.backward()
            if mode == "attached":
                reg.advance()
            assert not reg._pending
        grads[wrapped] = [p.grad.clone() for p in model.parameters()]
        values[wrapped] = [float(v) for v in reg.values.values()]
    for plain, wrapped in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(wrapped, plain, rtol=1e-10, atol=1e-12)
    assert values[True] == pytest.approx(values[False], rel=1e-10)


@pytest.mark.parametrize("mode", ["loss_term", "attached"])
def test_reentrant_checkpointing_is_a_clear_error(mode):
    """use_reentrant=True hides the forward from the hooks: an error naming the fix, never a 0."""
    model, ids = _model(), _ids()
    _checkpointed(model, reentrant=True, blocks=(1,))  # block 0 is still seen
    reg = ESSRegularizer(model, weight=1.0, splits=4)
    if mode == "attached":
        reg.attach()
    loss = _loss(model, ids)
    if mode == "loss_term":
        loss = loss + reg()
    with pytest.raises(RuntimeError, match=r"blocks\.1\.inner\.mixer.*use_reentrant=False"):
        loss.backward()


def test_lbfgs_through_the_closure():
    model, ids = _model(), _ids()
    opt = ESSOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3), ESSRegularizer(model))

    def closure():
        opt.zero_grad()
        loss = _loss(model, ids)
        loss.backward()
        return loss

    first = opt.step(closure)
    second = opt.step(closure)
    assert torch.isfinite(first) and torch.isfinite(second) and second < first
    assert opt.regularizer.step_count == 2


def test_pickled_optimizer_keeps_its_grad_scaler():
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    opt = ESSOptimizer(torch.optim.AdamW(model.parameters()), ESSRegularizer(model), grad_scaler=scaler)
    restored = pickle.loads(pickle.dumps(opt))
    assert restored.regularizer._grad_scaler is not None
    assert restored.regularizer._grad_scale() == scaler.get_scale()


def _hf_mamba(seed: int = 0) -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    config = MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=1, vocab_size=VOCAB, expand=2)
    return MambaForCausalLM(config).double()


def _logits_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).square().mean()


def _compiled_run(backend: str | None, steps: int, mode: str = "attached",
                  kind: str = "gla") -> tuple[list[int], dict[str, torch.Tensor]]:
    """``steps`` regularized steps (active and skipped ones); graphs compiled after each step."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    model = _model() if kind == "gla" else _hf_mamba()
    ids = _ids(length=24 if kind == "gla" else 8)
    reg = ESSRegularizer(model, weight=0.5, splits=4, every_n_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    if mode == "attached":
        opt = ESSOptimizer(opt, reg)
    run = model if backend is None else torch.compile(model, backend=backend)
    graphs = []
    for _ in range(steps):
        loss = _logits_loss(run, ids)
        (loss if mode == "attached" else loss + reg()).backward()
        opt.step()
        opt.zero_grad()
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    return graphs, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "mode", "kind"), [
    ("eager", "attached", "gla"), ("aot_eager", "attached", "gla"), ("eager", "loss_term", "gla"),
    ("aot_eager", "loss_term", "gla"), ("eager", "attached", "hf_mamba"), ("eager", "loss_term", "hf_mamba")])
def test_torch_compile_compiles_once_and_matches_eager(backend, mode, kind):
    steps = 20 if kind == "gla" else 8
    graphs, compiled = _compiled_run(backend, steps, mode, kind)
    assert graphs[-1] == graphs[3], graphs  # active and skipped steps compiled in the first steps
    _, eager = _compiled_run(None, steps, mode, kind)
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-9, atol=1e-12)


def test_last_penalty_agrees_across_modes_and_state_dict_round_trips():
    values = {}
    for mode in ("loss_term", "attached"):
        model, ids = _model(), _ids()
        reg = ESSRegularizer(model, weight=0.5, splits=4)
        assert reg.last_penalty is None
        if mode == "attached":
            reg.attach()
            _loss(model, ids).backward()
            reg.advance()
        else:
            _loss(model, ids)
            returned = reg()
            assert torch.equal(reg.last_penalty, returned.detach())
        values[mode] = float(reg.last_penalty)
        assert reg.last_penalty.grad_fn is None
    assert values["attached"] == pytest.approx(values["loss_term"], rel=1e-12)
    reg = ESSRegularizer(_model(), splits=3)
    for _ in range(3):
        reg._splits_for(20)
        reg.advance()
    state = reg.state_dict()
    twin = ESSRegularizer(_model(), splits=3)
    twin.load_state_dict(state)
    assert twin.step_count == 3 and torch.equal(twin._splits_for(20), reg._splits_for(20))
    with pytest.raises(ValueError, match="ESSRegularizer.state_dict"):
        twin.load_state_dict({"step": 1})


@pytest.mark.parametrize("kind", ["gla", "hf_mamba"])
@pytest.mark.parametrize("mode", ["loss_term", "attached"])
def test_plain_loop_save_and_resume_is_bit_identical(tmp_path, mode, kind):
    """Model, optimizer (with the ESS schedule inside ESSOptimizer) and RNG saved at step 3 of 6."""
    length = 24 if kind == "gla" else 8

    def build():
        model = _model() if kind == "gla" else _hf_mamba()
        reg = ESSRegularizer(model, weight=0.5, splits=3, every_n_steps=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, reg, (ESSOptimizer(opt, reg) if mode == "attached" else opt)

    def step(model, reg, opt, i):
        opt.zero_grad()
        loss = _logits_loss(model, _ids(seed=10 + i, length=length))
        (loss if mode == "attached" else loss + reg()).backward()
        opt.step()

    model, reg, opt = build()
    for i in range(6):
        step(model, reg, opt, i)
    straight = [p.detach().clone() for p in model.parameters()]

    model, reg, opt = build()
    for i in range(3):
        step(model, reg, opt, i)
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                  "regularizer": reg.state_dict()}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    del model, reg, opt
    model, reg, opt = build()
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    reg.load_state_dict(loaded["regularizer"])
    for i in range(3, 6):
        step(model, reg, opt, i)
    for p, q in zip(model.parameters(), straight, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("mode", ["loss_term", "attached"])
def test_a_no_grad_forward_between_forward_and_backward_under_checkpointing(mode):
    """An evaluation (or ESS logging) forward under no_grad before backward is not reentrant use."""
    from ess_reg import capture_operators

    model, ids = _model(), _ids()
    _checkpointed(model, reentrant=False)
    reg = ESSRegularizer(model, weight=1.0, splits=4)
    if mode == "attached":
        reg.attach()
    loss = _loss(model, ids)
    if mode == "loss_term":
        loss = loss + reg()
    with torch.no_grad():
        model(ids)
        capture_operators(model, ids)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradient_accumulation_agrees_across_modes():
    """Two micro-batches per optimizer step: attached divides its injected term like the loss, and
    both modes count one schedule step."""
    ids = _ids()
    grads = {}
    for mode in ("loss_term", "attached"):
        model = _model()
        reg = ESSRegularizer(model, weight=1.0, splits=4, accumulation_steps=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        if mode == "attached":
            opt = ESSOptimizer(opt, reg)
        for half in (ids[:2], ids[2:]):
            loss = _loss(model, half) * 0
            if mode == "loss_term":
                loss = loss + reg()
            (loss / 2).backward()
        opt.step()
        assert reg.step_count == 1
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["loss_term"], grads["attached"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("mode", ["loss_term", "attached"])
def test_hf_gradient_checkpointing_keeps_penalty_and_gradients(mode):
    """transformers' own gradient_checkpointing_enable (non-reentrant) on a small Mamba."""
    ids = _ids(length=8)
    grads = {}
    for checkpointed in (False, True):
        model = _hf_mamba()
        model.train()
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reg = ESSRegularizer(model, weight=1.0, splits=3)
        if mode == "attached":
            reg.attach()
        loss = _logits_loss(model, ids)
        (loss + reg() if mode == "loss_term" else loss).backward()
        grads[checkpointed] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mixer", ["gla", "sa", "hyena"])
def test_skipped_steps_two_views_and_a_value_after_backward(mixer):
    """Every layer kind: steps without reg() (a layer whose operator is off the loss's path
    included), two views backwarded one by one, and reg() read after a backward (its value only)."""
    torch.manual_seed(0)
    model = SequenceModel(mixer, d_model=16, n_layers=1, vocab_size=VOCAB)
    ids = _ids()
    reg = ESSRegularizer(model, splits=4)
    for step in range(4):
        loss = _loss(model, ids)
        if step % 2:
            loss = loss + reg()
        loss.backward()
    _loss(model, ids).backward()
    (_loss(model, ids) + reg()).backward()
    _loss(model, ids).backward()
    value = reg()
    assert torch.isfinite(value) and not value.requires_grad
