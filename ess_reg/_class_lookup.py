"""One class-hierarchy lookup for every type-keyed registry (extractors, init schemes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

Value = TypeVar("Value")


def lookup_by_class(table: Mapping[type, Value], obj: object) -> Value | None:
    """The entry for ``obj``'s class or its nearest base class in ``table`` (MRO order), else None."""
    for cls in type(obj).__mro__:
        if cls in table:
            return table[cls]
    return None
