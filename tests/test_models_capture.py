"""SequenceModel and the capture registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ess_reg import DenseOperator, capture_operators, ess_curve, register_extractor
from ess_reg.capture import supported_types
from ess_reg.models import AutoEncoderModel, SequenceModel


def test_sequence_model_shapes_and_hybrids():
    model = SequenceModel(["gla", "sa"], d_model=32, n_layers=3, vocab_size=50)
    assert model.mixer_names == ["gla", "sa", "gla"]
    ids = torch.randint(0, 50, (2, 12))
    assert model(ids).shape == (2, 12, 50)
    assert SequenceModel.from_config(model.config).mixer_names == model.mixer_names


def test_mixer_kwargs_reach_the_mixers_that_take_them():
    model = SequenceModel(["s6", "ssd"], d_model=32, n_layers=2, vocab_size=20, d_state=8)
    assert [m.state_size for m in model.mixers] == [8, 8]
    with pytest.raises(TypeError, match="not accepted"):
        SequenceModel("gla", d_model=32, vocab_size=20, bogus=1)
    with pytest.raises(ValueError, match="unknown mixer"):
        SequenceModel("lstm")


def test_capture_operators_returns_every_mixer_by_name():
    model = SequenceModel(["gla", "sa"], d_model=32, n_layers=2, vocab_size=50)
    ids = torch.randint(0, 50, (2, 16))
    operators = capture_operators(model, ids)
    assert list(operators) == ["blocks.0.mixer", "blocks.1.mixer"]
    assert operators["blocks.0.mixer"].state_size == model.mixers[0].state_size
    assert isinstance(operators["blocks.1.mixer"], DenseOperator)
    assert operators["blocks.1.mixer"].shape == (2, 4)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_captured_operators_match_the_mixer_trace():
    torch.manual_seed(0)
    model = SequenceModel("s6", d_model=32, n_layers=1, vocab_size=30).double()
    ids = torch.randint(0, 30, (2, 10))
    operator = capture_operators(model, ids)["blocks.0.mixer"]
    hidden = model.blocks[0].norm1(model.embedding(ids))
    torch.testing.assert_close(operator.dense(), model.mixers[0].trace(hidden).operator.dense())


def test_capture_keeps_the_graph_for_regularizers():
    model = SequenceModel("gla", d_model=32, n_layers=1, vocab_size=30)
    operators = capture_operators(model, torch.randint(0, 30, (2, 10)))
    ess_curve(operators["blocks.0.mixer"], splits=3).mean().backward()
    assert model.blocks[0].mixer.k.weight.grad is not None


def test_hooks_are_removed_when_the_forward_raises():
    model = SequenceModel("gla", d_model=32, n_layers=1, vocab_size=30)
    with pytest.raises(IndexError):
        capture_operators(model, torch.full((1, 5), 99))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert capture_operators(model, torch.randint(0, 30, (1, 5)))


def test_unrecognised_model_lists_what_is_supported():
    with pytest.raises(ValueError, match=r"no module ess-reg recognises; supported types: .*SequenceMixer"):
        capture_operators(nn.Linear(3, 3), torch.randn(2, 3))
    assert any("SequenceMixer" in t for t in supported_types())
    assert not any("``" in t for t in supported_types())  # rule names read as plain text


class _CumulativeMean(nn.Module):
    """y_i = mean(x_0 .. x_i): a toy layer taught to the registry."""

    def forward(self, x):  # [B, L, D]
        return x.cumsum(1) / torch.arange(1, x.shape[1] + 1)[:, None]


def test_register_extractor_teaches_new_module_types():
    def extract(module, args, kwargs, output):
        x = args[0]
        length = x.shape[1]
        matrix = torch.ones(length, length).tril() / torch.arange(1, length + 1)[:, None]
        return DenseOperator(matrix.expand(x.shape[0], 1, length, length))

    register_extractor(_CumulativeMean, extract)
    model = nn.Sequential(nn.Linear(4, 4), _CumulativeMean())
    operators = capture_operators(model, torch.randn(2, 9, 4))
    assert list(operators) == ["1"]
    assert ess_curve(operators["1"], "tolerance", tol=1e-9).max() == 1  # rank one
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_extractor(int, extract)


def test_autoencoder_model_for_compression():
    model = AutoEncoderModel("la", d_model=32, n_layers=1, vocab_size=16, max_len=12)
    ids = torch.randint(0, 16, (3, 12))
    assert model(ids).shape == (3, 12, 16)
    assert list(capture_operators(model, ids)) == ["encoder.blocks.0.mixer"]


@pytest.mark.parametrize("where", ["mix", "readout"])
def test_a_forward_that_raises_leaves_no_request_armed_and_no_graph(where, monkeypatch):
    import copy

    from ess_reg import ESSRegularizer, TransitionPenalty

    model = SequenceModel("gla", d_model=16, n_layers=1, vocab_size=30)
    mixer = model.blocks[0].mixer
    reg, penalty = ESSRegularizer(model, splits=2), TransitionPenalty(model, 0.1)
    ids = torch.randint(0, 30, (2, 8))

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(mixer, where, fail)
    with pytest.raises(RuntimeError, match="simulated"):
        model(ids)
    monkeypatch.undo()
    held = [v for v in vars(mixer).values() if isinstance(v, torch.Tensor) and v.grad_fn is not None]
    assert not held and mixer.captured_operator is None and mixer.captured_transition is None
    assert not mixer._capture_operator and not mixer._capture_transition
    copy.deepcopy(model)  # an EMA copy after a failed step
    with torch.no_grad():
        model(ids)  # a forward the regularizer did not arm keeps nothing
    assert mixer.captured_operator is None and mixer.captured_io is None
    reg.remove()
    penalty.remove()


def test_warnings_from_hooks_name_the_users_line():
    from ess_reg import ESSRegularizer

    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    reg = ESSRegularizer(model)
    with pytest.warns(UserWarning, match="leaves out layer") as record:
        model(torch.randn(2, 6, 16))  # the line the warning names
    assert {r.filename for r in record if "leaves out" in str(r.message)} == {__file__}
    reg.remove()


def test_a_failed_forward_leaves_nothing_pending_and_a_raising_user_hook_strands_no_graph():
    import copy

    from ess_reg import ESSRegularizer

    ids, ids2 = torch.randint(0, 30, (2, 8)), torch.randint(0, 30, (2, 8))
    torch.manual_seed(0)
    model = SequenceModel("gla", d_model=16, n_layers=2, vocab_size=30)
    clean = copy.deepcopy(model)
    reg = ESSRegularizer(model, splits=[2, 5])

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure in layer 1")

    model.blocks[1].mixer.mix = fail  # layer 0 was captured before layer 1 raised
    with pytest.raises(RuntimeError, match="simulated"):
        model(ids)
    del model.blocks[1].mixer.mix
    assert reg._pending == {}  # layer 0's operator (and its graph) is gone
    assert all(t.grad_fn is None for op in reg.operators.values() for t in op.tensors())
    model(ids2)
    reference = ESSRegularizer(clean, splits=[2, 5])
    clean(ids2)
    torch.testing.assert_close(reg(), reference())  # the failed forward does not count

    state = {"fail": True}

    def guard(module, args, output):  # a user's hook registered before the regularizer
        if state["fail"]:
            raise FloatingPointError("non-finite output")

    model = SequenceModel("gla", d_model=16, n_layers=1, vocab_size=30)
    model.blocks[0].mixer.register_forward_hook(guard)
    reg = ESSRegularizer(model, splits=2)
    with pytest.raises(FloatingPointError):
        model(ids)
    mixer = model.blocks[0].mixer
    assert mixer.captured_operator is None and mixer.captured_io is None
    copy.deepcopy(model)
    state["fail"] = False
    model(ids)
    assert reg() > 0
