"""Regularizers of a model's mixers: the ESS term and the paper's transition penalty."""

from ess_reg.regularizer.ess_regularizer import ESSRegularizer
from ess_reg.regularizer.options import Schedule, Target
from ess_reg.regularizer.selection import ModuleSelector, select_modules
from ess_reg.regularizer.transition import TransitionPenalty

__all__ = ["ESSRegularizer", "ModuleSelector", "Schedule", "Target", "TransitionPenalty", "select_modules"]
