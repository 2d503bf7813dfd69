"""ess-reg: measure and shape the effective state-size (ESS) of sequence models."""

from ess_reg.capture import Capture, capture_operators, register_extractor, register_extractor_rule
from ess_reg.capture_check import check_capture
from ess_reg.diagnostics import diagnose
from ess_reg.distill import distill_student, distillation_loss
from ess_reg.functional import (
    average_ess,
    ess_curve,
    memory_budget,
    set_memory_budget,
    split_singular_values,
    split_spectrum,
    theoretical_state_size,
    total_ess,
    utilization,
)
from ess_reg.operators import DenseOperator, DiagonalRealization, NotCausalError, Operator
from ess_reg.optim import ESSOptimizer
from ess_reg.regularizer import ESSRegularizer, TransitionPenalty
from ess_reg.sizing import state_size_needed

__version__ = "0.1.0"


def __getattr__(name: str):
    # ESSMetric pulls in torchmetrics (several seconds to import); load it on first use.
    if name == "ESSMetric":
        from ess_reg.metric import ESSMetric

        return ESSMetric
    if name == "ess_init":  # the init_schemes package, loaded on first use
        from init_schemes import ess_init

        return ess_init
    raise AttributeError(f"module 'ess_reg' has no attribute {name!r}")

__all__ = [
    "Capture",
    "DenseOperator",
    "DiagonalRealization",
    "ESSMetric",
    "ESSOptimizer",
    "ESSRegularizer",
    "NotCausalError",
    "Operator",
    "TransitionPenalty",
    "average_ess",
    "capture_operators",
    "check_capture",
    "diagnose",
    "distill_student",
    "distillation_loss",
    "ess_curve",
    "ess_init",
    "memory_budget",
    "register_extractor",
    "register_extractor_rule",
    "set_memory_budget",
    "split_singular_values",
    "split_spectrum",
    "state_size_needed",
    "theoretical_state_size",
    "total_ess",
    "utilization",
]
