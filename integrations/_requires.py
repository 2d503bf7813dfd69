"""One-line errors for missing optional packages (private)."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(package: str, extra: str) -> ModuleType:
    """Import ``package`` or raise ``ImportError`` saying which pip extra installs it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(
            f"this integration needs {package}: pip install 'ess-reg[{extra}]'"
        ) from None
