"""Run independent CPU linear-algebra calls on all cores (private).

LAPACK calls on small matrices (the ``N x N`` factorizations of the Gramian route) run on one core
each; torch releases the GIL inside them, so a thread pool over independent calls uses every core.
On accelerators the calls are issued in order on the caller's thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_POOL: ThreadPoolExecutor | None = None


def parallel_map(fn: Callable[[T], R], items: Sequence[T], device: torch.device) -> list[R]:
    """``[fn(x) for x in items]``, spread over ``torch.get_num_threads()`` threads on CPU."""
    workers = torch.get_num_threads()
    if device.type != "cpu" or workers < 2 or len(items) < 2:
        return [fn(x) for x in items]
    global _POOL
    if _POOL is None or _POOL._max_workers != workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ess-reg")
    return list(_POOL.map(fn, items))
