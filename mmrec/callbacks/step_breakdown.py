"""Where a training step's time goes: waiting for data, forward, backward, optimizer, and host syncs.

Throughput figures say how fast training is; this says why. For ``steps`` training steps after ``skip``
warm-up steps (compilation, allocator growth) it synchronises the device at each phase boundary and
records the wall time of each phase, and it counts the operations that made the host wait for the GPU
(``torch.cuda.set_sync_debug_mode``: ``.item()``, ``bool(tensor)``, boolean indexing, ...), the usual
reason a small model leaves a GPU idle. The synchronisations slow the steps it times, so the figures are
a breakdown, not a throughput: read tokens/s from a run without this callback.

    mmrec fit-recommender ... --trainer.callbacks+ mmrec.callbacks.step_breakdown.StepBreakdown

The summary is printed and written to ``<trainer.default_root_dir>/step_breakdown.json`` (rank 0).
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

PHASES = ("data", "forward", "backward", "optimizer", "step")


class StepBreakdown(Callback):
    """Median seconds per phase over ``steps`` training steps after ``skip``, and host syncs per step.

    Args:
        skip: training steps to leave alone first (compilation and warm-up).
        steps: training steps to time.
    """

    def __init__(self, skip: int = 10, steps: int = 10) -> None:
        self.skip, self.steps = skip, steps
        self.times: dict[str, list[float]] = {phase: [] for phase in PHASES}
        self.syncs: list[int] = []
        self._marks: dict[str, float] = {}
        self._caught: Any = None
        self._records: list[warnings.WarningMessage] | None = None

    def _active(self, trainer: L.Trainer) -> bool:
        return self.skip <= trainer.global_step < self.skip + self.steps

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if "start" in self._marks:
            end = self._now(pl_module)
            marks = self._marks
            self.times["forward"].append(marks["forward"] - marks["start"])
            self.times["backward"].append(marks["backward"] - marks["forward"])
            self.times["optimizer"].append(end - marks["backward"])
            self.times["step"].append(end - marks["start"])
            self._stop_counting_syncs(pl_module)
        self._marks = {"end": self._now(pl_module)} if self._active(trainer) else {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._active(trainer):
            return
        start = self._now(pl_module)
        if "end" in self._marks:
            self.times["data"].append(start - self._marks["end"])
        self._marks = {"start": start}
        if pl_module.device.type == "cuda":
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if "start" in self._marks:
            self._marks["forward"] = self._now(pl_module)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if "forward" in self._marks:
            self._marks["backward"] = self._now(pl_module)

    def _stop_counting_syncs(self, pl_module: L.LightningModule) -> None:
        if self._caught is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._caught.__exit__(None, None, None)
        self.syncs.append(sum("synchroniz" in str(record.message) for record in self._records or []))
        self._caught, self._records = None, None

    def summary(self) -> dict[str, Any]:
        """Median seconds per phase (``data`` is the wait between steps), steps timed, host syncs per step."""
        medians = {f"{phase}_s": round(statistics.median(values), 5) for phase, values in self.times.items() if values}
        syncs = round(statistics.mean(self.syncs), 1) if self.syncs else None
        return {**medians, "steps_timed": len(self.times["step"]), "host_syncs_per_step": syncs}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        summary = self.summary()
        if trainer.is_global_zero:
            print(f"step breakdown: {summary}")
            path = Path(trainer.default_root_dir) / "step_breakdown.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=2) + "\n")
