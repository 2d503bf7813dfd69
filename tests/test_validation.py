"""Every validation error names the argument and says what was expected."""

from __future__ import annotations

import pytest
import torch
from conftest import random_causal, random_realization

from ess_reg import DenseOperator, DiagonalRealization, ess_curve, split_singular_values


def test_dense_wrong_rank():
    with pytest.raises(ValueError, match=r"matrix must have shape .*matrix\[None\]"):
        DenseOperator(torch.eye(4))
    with pytest.raises(ValueError, match="merge the extra leading dims"):
        DenseOperator(torch.zeros(2, 2, 2, 4, 4))


def test_dense_not_square():
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.zeros(1, 4, 5))


def test_dense_too_short():
    with pytest.raises(ValueError, match="at least 2 positions"):
        DenseOperator(torch.ones(1, 1, 1))


def test_dense_not_causal_reports_largest_entry():
    matrix = random_causal(2, 5)
    matrix[1, 1, 3] = 7.5
    with pytest.raises(ValueError, match=r"not causal.*7\.5 at index \(1, 1, 3\)"):
        DenseOperator(matrix)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_dense_non_finite(bad):
    matrix = random_causal(1, 4)
    matrix[0, 2, 1] = bad
    with pytest.raises(ValueError, match=r"matrix contains 1 non-finite.*\(0, 2, 1\)"):
        DenseOperator(matrix)


def test_dense_type_errors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        DenseOperator([[1.0, 0.0], [1.0, 1.0]])
    with pytest.raises(TypeError, match="floating-point"):
        DenseOperator(torch.ones(1, 3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="must be real"):
        DenseOperator(torch.ones(1, 3, 3, dtype=torch.complex64).tril())


def test_realization_shape_errors():
    c, b, ld = random_realization(2, 6, 3)
    with pytest.raises(ValueError, match="b must have the same shape as c"):
        DiagonalRealization(c, b[..., :2], ld)
    with pytest.raises(ValueError, match="c must have shape"):
        DiagonalRealization(c[0], b[0], ld[0])
    with pytest.raises(ValueError, match="log_decay must have shape"):
        DiagonalRealization(c, b, ld[..., :2])
    with pytest.raises(ValueError, match="log_decay must have shape"):
        DiagonalRealization(c, b, ld[:, :5])
    with pytest.raises(ValueError, match="at least 2 positions"):
        DiagonalRealization(c[:, :1], b[:, :1])
    with pytest.raises(ValueError, match="N = 0"):
        DiagonalRealization(c[..., :0], b[..., :0])


def test_realization_non_finite_and_unstable():
    c, b, ld = random_realization(2, 6, 3)
    bad = c.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="c contains 1 non-finite"):
        DiagonalRealization(bad, b, ld)
    bad = b.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="b contains 1 non-finite"):
        DiagonalRealization(c, bad, ld)
    bad = ld.clone()
    bad[0, 0, 0] = -float("inf")
    with pytest.raises(ValueError, match="log_decay contains 1 non-finite"):
        DiagonalRealization(c, b, bad)
    bad = ld.clone()
    bad[0, 3, 1] = 0.25
    with pytest.raises(ValueError, match=r"log_decay has a positive entry 0\.25.*unstable"):
        DiagonalRealization(c, b, bad)
    DiagonalRealization(c, b, ld.clamp_max(0) + 1e-9)  # rounding noise is accepted


def test_realization_type_errors():
    c, b, _ = random_realization(2, 6, 3)
    with pytest.raises(TypeError, match="b must be a torch.Tensor"):
        DiagonalRealization(c, b.numpy())
    with pytest.raises(TypeError, match="log_decay must be a floating-point"):
        DiagonalRealization(c, b, torch.zeros(2, 6, 3, dtype=torch.int32))


def test_functional_argument_errors():
    op = random_causal(2, 6)
    with pytest.raises(ValueError, match="kind must be one of"):
        ess_curve(op, "rank")
    with pytest.raises(ValueError, match="method must be one of"):
        ess_curve(op, method="svd")
    with pytest.raises(ValueError, match="needs a state realization"):
        ess_curve(op, method="gramian")
    with pytest.raises(ValueError, match="dtype must be torch.float64 or torch.float32"):
        ess_curve(op, dtype=torch.float16)
    with pytest.raises(ValueError, match="tol must be a finite number"):
        ess_curve(op, "tolerance", tol=-1.0)
    with pytest.raises(TypeError, match="operator must be"):
        ess_curve("not an operator")


@pytest.mark.parametrize(
    ("splits", "error", "pattern"),
    [
        ([0, 2], ValueError, r"1 \.\. L-1 = 1 \.\. 5"),
        ([6], ValueError, "1 .. 5"),
        (0, ValueError, "positive number of splits"),
        (torch.tensor([1.5]), TypeError, "integer split indices"),
        (torch.tensor([[1, 2]]), ValueError, "1-D"),
        ([], ValueError, "non-empty"),
        ("3", TypeError, "splits must be"),
        (True, TypeError, "bool"),
        (torch.tensor(3), ValueError, "pass a Python int"),
    ],
)
def test_split_errors(splits, error, pattern):
    with pytest.raises(error, match=pattern):
        split_singular_values(random_causal(1, 6), splits=splits)


def test_numpy_integer_counts_splits_like_an_int():
    import numpy as np

    matrix = random_causal(1, 9)
    assert torch.equal(split_singular_values(matrix, splits=np.int64(3)),
                       split_singular_values(matrix, splits=3))


def test_state_size_override_is_checked():
    c, b, ld = random_realization(2, 6, 3, complex_=True)
    assert DiagonalRealization(c, b, ld, state_size=3).state_size == 3
    assert DiagonalRealization(c, b, ld, state_size=3).to(torch.complex64).state_size == 3
    with pytest.raises(ValueError, match=r"state_size must be an int in 1 \.\. 6"):
        DiagonalRealization(c, b, ld, state_size=7)


def test_unvalidated_operators_with_nan_are_refused_before_the_svd():
    c, b, ld = random_realization(1, 8, 2)
    c[0, 3, 1] = float("nan")
    op = DiagonalRealization(c, b, ld, validate=False)
    for method in ("dense", "gramian"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            ess_curve(op, method=method)
    matrix = random_causal(1, 6)
    matrix[0, 4, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ess_curve(DenseOperator(matrix, validate=False))


def test_on_accelerators_a_non_finite_operator_gives_nan_without_a_host_check(monkeypatch):
    """Off the CPU the finite check stays on the device (no host synchronisation): the values of a
    non-finite operator become NaN (never a finite guess), those of a finite one are unchanged, and
    gradients of a finite operator flow as before. Exercised on the CPU by forcing the deferred path."""
    from ess_reg.functional import ess as ess_module

    real = ess_module._finite_operator
    monkeypatch.setattr(ess_module, "_finite_operator", lambda op: real(op, defer=True))
    c, b, ld = random_realization(2, 8, 2)
    for method in ("dense", "gramian"):
        clean = DiagonalRealization(c, b, ld)
        expected = split_singular_values(clean, method=method)
        monkeypatch.undo()
        torch.testing.assert_close(expected, split_singular_values(clean, method=method), rtol=0, atol=0)
        monkeypatch.setattr(ess_module, "_finite_operator", lambda op: real(op, defer=True))
        broken = c.clone()
        broken[1, 3, 1] = float("nan")
        curve = ess_curve(DiagonalRealization(broken, b, ld, validate=False), method=method)
        assert torch.isnan(curve).all()
    leaf = c.clone().requires_grad_(True)
    ess_curve(DiagonalRealization(leaf, b, ld)).sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    matrix = random_causal(1, 6)
    matrix[0, 4, 2] = float("inf")
    assert torch.isnan(ess_curve(DenseOperator(matrix, validate=False))).all()


def test_huge_finite_entries_are_not_mistaken_for_inf():
    matrix = torch.full((1, 8, 8), 1e307, dtype=torch.float64).tril()  # its sum overflows to inf
    curve = ess_curve(DenseOperator(matrix), "tolerance")
    assert torch.isfinite(curve).all()
    matrix[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ess_curve(DenseOperator(matrix))


@pytest.mark.parametrize(
    ("bad", "message"),
    [(lambda: __import__("numpy").zeros((2, 8), dtype="int64"), "torch.as_tensor"),
     (lambda: [[1, 2, 3, 4]], r"torch.tensor\(x"),
     (lambda: {"input_ids": torch.zeros(2, 8, dtype=torch.long)}, "'input_ids' entry"),
     (lambda: torch.zeros(8, dtype=torch.long), r"x\[None\]")],
)
def test_token_ids_of_the_wrong_kind_say_how_to_fix_them(bad, message):
    from ess_reg import capture_operators
    from ess_reg.models import SequenceModel

    with pytest.raises((TypeError, ValueError), match=message):
        capture_operators(SequenceModel("gla", 16, 1, 32), bad())


def test_sequences_of_length_one_have_no_split():
    from ess_reg import ESSRegularizer, capture_operators, state_size_needed
    from ess_reg.models import SequenceModel

    model = SequenceModel("gla", 16, 1, 32)
    ids = torch.zeros(2, 1, dtype=torch.long)
    op = next(iter(capture_operators(model, ids).values()))
    for call in (lambda: ess_curve(op), lambda: state_size_needed(model, ids)):
        with pytest.raises(ValueError, match="length 1 has no split"):
            call()
    reg = ESSRegularizer(model)
    model(ids)
    with pytest.raises(ValueError, match="'blocks.0.mixer' saw sequences of length 1"):
        reg()
