"""Framework glue for ess-reg.

- ``integrations.lightning``: ``ESSCallback`` (needs ``ess-reg[lightning]``);
- ``integrations.hf``: ``ESSTrainerCallback``, ``ESSTrainerMixin`` (needs ``ess-reg[hf]``);
- ``integrations.timm``: ``create_ess_optimizer``, ``init_ess_``;
- ``integrations.pytorch_optimizer``: ``create_optimizer(..., ess=...)``;
- ``integrations.third_party``: extractors for real third-party layers (registered automatically).

Submodules are imported on demand, so a missing optional package only matters when its
integration is imported (with a one-line error naming the pip extra).
"""

__all__: list[str] = []
