"""Run independent CPU linear-algebra calls on all cores (private).

LAPACK calls on small and medium matrices (the ``N x N`` factorizations of the Gramian route, the
split blocks of the dense route) barely profit from LAPACK's own threads; torch releases the GIL
inside them, so a thread pool over independent calls keeps every core busy instead. Each worker
runs its calls single-threaded (``torch.set_num_threads(1)`` is per thread under OpenMP and MKL),
so pool and LAPACK never oversubscribe the cores; the caller's own setting is left as it was.
On accelerators the calls are issued in order on the caller's thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_POOL: ThreadPoolExecutor | None = None
#: Process that created ``_POOL`` (a forked child, e.g. a DataLoader worker, needs its own threads).
_POOL_PID = -1
#: Set when ``torch.set_num_threads`` turned out to be process-wide in this build.
_SEQUENTIAL = False


def _single_threaded_worker() -> None:
    torch.set_num_threads(1)


def parallel_map(fn: Callable[[T], R], items: Sequence[T], device: torch.device) -> list[R]:
    """``[fn(x) for x in items]``, spread over ``torch.get_num_threads()`` threads on CPU."""
    global _POOL, _POOL_PID, _SEQUENTIAL
    workers = torch.get_num_threads()
    if device.type != "cpu" or workers < 2 or len(items) < 2 or _SEQUENTIAL:
        return [fn(x) for x in items]
    if _POOL is None or _POOL._max_workers != workers or os.getpid() != _POOL_PID:
        if _POOL is not None and os.getpid() == _POOL_PID:
            _POOL.shutdown(wait=False)
        _POOL_PID = os.getpid()
        _POOL = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="ess-reg", initializer=_single_threaded_worker
        )
    results = list(_POOL.map(fn, items))
    if torch.get_num_threads() != workers:  # the workers' setting leaked into the caller's thread
        torch.set_num_threads(workers)
        _SEQUENTIAL = True
    return results
