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


def _internal(filename: str) -> bool:
    if filename.startswith("<"):  # <frozen ...>, <string> of exec'd library code
        return not filename.startswith("<stdin>") and not filename.startswith("<ipython")
    path = os.path.abspath(filename)
    return path.startswith(_PROJECT) or path.startswith(_LIBRARIES)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first caller outside libraries."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
