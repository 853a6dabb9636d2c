"""A callback for the kill tests (no tests here): it stops a training stage at a chosen step, in a state
the test can kill it in, and says so through a file.

Tiny stages train a step in milliseconds, so a test that waited for a checkpoint and then sent SIGKILL would
race the run to its end. Pausing at a fixed step instead makes the kill land at the same point every time:
after step ``step``'s optimizer update and before that step's own checkpoint (checkpoint callbacks run
after every other callback), so the run loses the steps since its last ``last.ckpt`` and the resumed run
must redo them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class PauseAtStep(Callback):
    """At the end of global step ``step``: write the step to ``marker`` (atomically), then sleep until killed.

    Under DDP every rank pauses at that step and rank 0 alone writes the marker; the test then kills the
    whole process group (the launcher's process and the ranks it started).
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = Path(marker)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
    ) -> None:
        if trainer.global_step == self.step:
            if trainer.is_global_zero:
                written = self.marker.with_suffix(".tmp")
                written.write_text(f"{trainer.global_step}\n")
                written.replace(self.marker)
            while True:
                time.sleep(60)
