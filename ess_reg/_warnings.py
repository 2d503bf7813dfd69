"""Warnings that point at the user's line, not into ess-reg, torch or another library (private).

A warning raised in a forward hook passes through ``torch.nn.Module.__call__``, torch.compile's
``disable`` wrapper and the model's own library before it reaches the user's code, so a fixed
``stacklevel`` would name a line of torch. :func:`warn_user` walks up to the first frame outside
the installed packages and this project's packages.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import warnings

_PROJECT = tuple(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + package + os.sep
                 for package in ("ess_reg", "integrations", "init_schemes"))
_LIBRARIES = tuple({os.path.abspath(p) + os.sep for key in ("purelib", "platlib", "stdlib", "platstdlib")
                    if (p := sysconfig.get_paths().get(key))})


def _internal(frame) -> bool:
    filename = frame.f_code.co_filename
    if filename.startswith("<"):  # <frozen ...>, generated code, or a user's -c / REPL / notebook cell
        return frame.f_globals.get("__name__") != "__main__"
    path = os.path.abspath(filename)
    return path.startswith(_PROJECT) or path.startswith(_LIBRARIES)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first caller outside libraries (the
    outermost frame when every frame is library code, e.g. under a test runner's exec)."""
    frame, level, outermost = sys._getframe(1), 2, 2
    while frame is not None and _internal(frame):
        frame, level = frame.f_back, level + 1
        if frame is not None:
            outermost = level
    warnings.warn(message, category, stacklevel=level if frame is not None else outermost)
