"""A callback for the DDP tests (no tests here): it checks that every rank ends training with the same weights.

DDP keeps replicas identical by all-reducing gradients; anything a stage edits in place (the quantizer's
k-means initialisation and dead-code re-seeding) it must synchronise itself, and a miss shows only as ranks
that silently drift apart, which rank 0's export alone would never reveal.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback


class RanksAgree(Callback):
    """At the end of training, rank 0 writes ``{"digests": [one per rank]}`` of the model's state dict to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digests = [None] * trainer.world_size
        dist.all_gather_object(digests, digest.hexdigest())
        if trainer.is_global_zero:
            self.path.write_text(json.dumps({"digests": digests}))
