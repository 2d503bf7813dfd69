"""Memory budget of the ESS routes: estimate before allocating, chunk or refuse with a clear error.

Both routes estimate what an evaluation needs before they allocate it. Work that can be split
(independent channels, groups of splits in the dense route's backward) is processed in pieces
that fit the budget; what cannot fit raises :class:`MemoryError` with a one-line message naming
the fixes, never a raw allocator error after minutes of work.

The budget defaults to half of the memory available on the operator's device (``MemAvailable`` on
Linux hosts, free memory on CUDA devices) and is set with :func:`set_memory_budget`.
"""

from __future__ import annotations

import os
import time

import torch

#: Fraction of the available memory an evaluation may use when no budget is set.
DEFAULT_FRACTION = 0.5
#: Assumed available host memory where the platform does not say (8 GiB).
_FALLBACK_AVAILABLE = 8 << 30

_budget: int | None = None
#: device -> (time read, free bytes): the free memory is read at most every ``_CACHE_SECONDS``.
_available_cache: dict[str, tuple[float, int]] = {}
_CACHE_SECONDS = 1.0


def set_memory_budget(nbytes: int | None) -> None:
    """Bytes one ESS evaluation may allocate; ``None`` restores the default (half of what is free).

    Example: ``ess_reg.set_memory_budget(4 << 30)`` caps every evaluation at 4 GiB.
    """
    global _budget
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1):
        raise ValueError(f"nbytes must be a positive int (bytes) or None, got {nbytes!r}")
    _budget = nbytes


def memory_budget(device: torch.device | str | None = None) -> int:
    """The budget in bytes for an evaluation on ``device`` (default: the CPU).

    The free memory behind the default budget is read at most once a second per device, so a
    training step that evaluates several layers does not query it each time.
    """
    if _budget is not None:
        return _budget
    device = torch.device(device or "cpu")
    now = time.monotonic()
    cached = _available_cache.get(str(device))
    if cached is None or now - cached[0] > _CACHE_SECONDS:
        cached = (now, available_memory(device))
        _available_cache[str(device)] = cached
    return int(DEFAULT_FRACTION * cached[1])


def available_memory(device: torch.device) -> int:
    """Bytes currently free on ``device`` (host memory for the CPU)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return _FALLBACK_AVAILABLE


def require_fits(nbytes: int, device: torch.device, what: str, fixes: str) -> None:
    """Raise a one-line :class:`MemoryError` if ``nbytes`` exceeds the budget for ``device``."""
    budget = memory_budget(device)
    if nbytes > budget:
        raise MemoryError(
            f"{what} needs about {_gib(nbytes)}, above the memory budget of {_gib(budget)}; "
            f"{fixes}; or raise the budget with ess_reg.set_memory_budget(nbytes)"
        )


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB" if nbytes >= 1 << 26 else f"{nbytes / (1 << 20):.1f} MiB"
