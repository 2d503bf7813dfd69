"""Synthetic memory tasks: MQAR, selective copying and compression, with their accuracy."""

from ess_reg.tasks.base import IGNORE_INDEX, SyntheticTask, accuracy, loss_fn
from ess_reg.tasks.compression import Compression
from ess_reg.tasks.mqar import MQAR, BoundarySplits
from ess_reg.tasks.selective_copying import SelectiveCopying

TASKS = {"mqar": MQAR, "selective_copying": SelectiveCopying, "compression": Compression}

__all__ = [
           "IGNORE_INDEX",
           "MQAR",
           "TASKS",
           "BoundarySplits",
           "Compression",
           "SelectiveCopying",
           "SyntheticTask",
           "accuracy",
           "loss_fn",
]
