"""Functional ESS math: split spectra, ESS curves and their aggregates."""

from ess_reg.functional.ess import (
    DEFAULT_TOL,
    SplitSpectrum,
    average_ess,
    ess_curve,
    resolve_method,
    split_capacity,
    split_singular_values,
    split_spectrum,
    theoretical_state_size,
    total_ess,
    utilization,
    utilization_from_curve,
)
from ess_reg.functional.memory import memory_budget, set_memory_budget
from ess_reg.functional.spectrum import entropy_ess, tolerance_ess
from ess_reg.functional.splits import resolve_splits
from ess_reg.functional.summary import ess_summary

__all__ = [
    "DEFAULT_TOL",
    "SplitSpectrum",
    "average_ess",
    "entropy_ess",
    "ess_curve",
    "ess_summary",
    "memory_budget",
    "resolve_method",
    "resolve_splits",
    "set_memory_budget",
    "split_capacity",
    "split_singular_values",
    "split_spectrum",
    "theoretical_state_size",
    "tolerance_ess",
    "total_ess",
    "utilization",
    "utilization_from_curve",
]
