"""ESS-informed initializers for featurizers and state-space parameters (timm-style ``*_`` functions)."""

__all__: list[str] = []
