"""FSDP for the LLM heads: Lightning's strategy, able to validate the best checkpoint after ``fit``.

Lightning wraps the LightningModule in a root ``FullyShardedDataParallel`` at every ``setup``, unless some
submodule already is an FSDP unit, and after ``fit`` the auto-wrapped decoder layers are. So the ``validate``
that follows ``fit`` (the best checkpoint's metrics, then the export's full state dict) runs on an unwrapped
root whose own parameters (item encoder, fusion head, SID embeddings) are still the flat shards FSDP left
them as, and its first step fails (``mat2 must be a matrix``; Lightning issue #19015, open since 2023). The
strategy here reuses the root wrapper that ``fit`` built whenever it sets up the same module again.
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from torch import nn


class FSDPStrategy(LightningFSDPStrategy):
    """Lightning's ``FSDPStrategy`` whose later ``setup`` calls (``validate``/``test`` after ``fit``) reuse the
    root FSDP wrapper of the first; every option is Lightning's."""

    _root: nn.Module | None = None

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self._root is not None and self._root.module is model:
            return self._root
        self._root = super()._setup_model(model)
        return self._root
