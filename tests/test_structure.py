"""Package structure promises: public names, one capacity definition, imports without side effects."""

import subprocess
import sys

import pytest
import torch

import ess_reg
from ess_reg.functional import split_capacity, utilization
from ess_reg.operators import DenseOperator, DiagonalRealization


def test_importing_plots_leaves_the_matplotlib_backend_alone(tmp_path):
    target = tmp_path / "c.png"
    code = (
        "import matplotlib; matplotlib.use('svg'); import ess_reg.plots, ess_reg.cli, ess_reg.metric; "
        "import numpy as np; "
        f"ess_reg.plots.plot_ess_curves({{'a': (np.arange(1, 8), np.ones(7))}}, {str(target)!r}, seq_len=8); "
        "print(matplotlib.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"
    assert target.read_bytes()[:4] == b"\x89PNG"


def test_regularizer_package_keeps_public_names():
    from ess_reg.regularizer import ESSRegularizer, TransitionPenalty, select_modules

    assert ess_reg.ESSRegularizer is ESSRegularizer and ess_reg.TransitionPenalty is TransitionPenalty
    assert callable(select_modules)


def test_split_capacity_is_tss_or_edge_bound():
    dense = DenseOperator(torch.randn(2, 6, 6, dtype=torch.float64).tril())
    assert split_capacity(dense, [1, 2, 3, 5]).tolist() == [1, 2, 3, 1]
    real = DiagonalRealization(torch.randn(1, 6, 3), torch.randn(1, 6, 3), -torch.rand(1, 6, 3))
    assert split_capacity(real, 4).tolist() == [3.0] * 4
    curve = ess_reg.ess_curve(dense, splits=[1, 2, 3, 5])
    assert torch.allclose(utilization(dense, splits=[1, 2, 3, 5]),
                          (curve / torch.tensor([1.0, 2, 3, 1], dtype=curve.dtype)).mean(-1))


@pytest.mark.parametrize("entry", ["capture_operators", "ESSRegularizer", "TransitionPenalty", "ess_init"])
def test_one_error_for_a_model_without_recognised_modules(entry):
    model = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="contains no module ess-reg recognises.*register_extractor"):
        if entry == "capture_operators":
            ess_reg.capture_operators(model, torch.randn(2, 3))
        elif entry == "ESSRegularizer":
            ess_reg.ESSRegularizer(model)
        elif entry == "TransitionPenalty":
            ess_reg.TransitionPenalty(model)
        else:
            from init_schemes import ess_init

            ess_init(model, probe=torch.randn(2, 3), verbose=False)


def test_ess_init_is_reachable_from_ess_reg_lazily():
    import subprocess
    import sys

    code = ("import sys, ess_reg; assert 'init_schemes' not in sys.modules; "
            "from ess_reg import ess_init; import init_schemes; assert ess_init is init_schemes.ess_init")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
