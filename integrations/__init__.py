"""Framework glue for ess-reg: Lightning, Hugging Face, timm and pytorch-optimizer."""

__all__: list[str] = []
