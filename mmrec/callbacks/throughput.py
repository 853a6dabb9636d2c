"""Training speed and memory, for the manifest and the benchmark table.

Wall time counts training only (validation passes inside ``fit`` are subtracted, the sanity check happens
before it starts). Of that time, the part between the last step of one epoch and the first of the next
(validation excluded: checkpoints, epoch hooks, the loader's next epoch) is also reported on its own: a cost
paid once an epoch, which weighs more the more devices share an epoch. Tokens are the prompt tokens the
backbone actually reads: text tokens plus one per history item, padding excluded. Peak memory is
``torch.cuda.max_memory_allocated`` over the whole fit.
Under DDP the tokens are summed over ranks (each reads its own share of every step), so tokens per second is
the whole job's; the seconds and peak memory are this process's (rank 0's, in the manifest).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def peak_gpu_memory_gib(device: torch.device) -> float | None:
    """The process's peak allocated GPU memory on ``device`` (GiB), None off a GPU: what a benchmark reports."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


class TrainingThroughput(Callback):
    """Measures seconds, tokens per second and peak GPU memory of ``trainer.fit``.

    Besides the whole run's rate it reports a steady one, from the end of training step ``steady_after`` on:
    the first steps of a compiled model pay its compilation (tens of seconds), which says nothing about how
    fast it then trains. The LightningModule must offer ``tokens_in(batch) -> Tensor`` (a 0-d count).

    Args:
        steady_after: training steps left out of the steady rate.
    """

    def __init__(self, steady_after: int = 20) -> None:
        self.steady_after = steady_after
        self.steady_mark: tuple[float, torch.Tensor, float] | None = None  # (time, tokens, validation seconds)
        self.steady: tuple[float, torch.Tensor] | None = None  # (seconds, tokens) after the mark
        self.tokens: torch.Tensor | None = None
        self.started: float | None = None
        self.validation_seconds = 0.0
        self.validation_started: float | None = None
        self.seconds = 0.0
        self.epoch_boundary_seconds = 0.0
        self.epoch_ended: tuple[float, float] | None = None  # (time, validation seconds) at an epoch's last step
        self.device: torch.device | None = None
        self.world_size = 1

    def _now(self) -> float:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.device = pl_module.device
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.tokens = torch.zeros((), dtype=torch.long, device=self.device)
        self.validation_seconds = 0.0
        self.epoch_boundary_seconds, self.epoch_ended = 0.0, None
        self.steady_mark, self.steady = None, None
        self.started = self._now()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and self.epoch_ended is not None:
            self._close_epoch_boundary()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.tokens is not None:
            self.tokens += pl_module.tokens_in(batch)
            if trainer.global_step == self.steady_after and self.steady_mark is None:
                self.steady_mark = (self._now(), self.tokens.clone(), self.validation_seconds)
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # two host syncs an epoch, not one a step
            self.epoch_ended = (self._now(), self.validation_seconds)

    def _close_epoch_boundary(self) -> None:
        assert self.epoch_ended is not None
        ended, validation = self.epoch_ended
        self.epoch_boundary_seconds += self._now() - ended - (self.validation_seconds - validation)
        self.epoch_ended = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.started is not None:
            self.validation_started = self._now()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validation_started is not None:
            self.validation_seconds += self._now() - self.validation_started
            self.validation_started = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.started is not None:
            if self.epoch_ended is not None:  # the last epoch's validation, checkpoints and early stopping
                self._close_epoch_boundary()
            end = self._now()
            self.seconds = end - self.started - self.validation_seconds
            if self.steady_mark is not None:
                mark, tokens, validation = self.steady_mark
                self.steady = (end - mark - (self.validation_seconds - validation), self.tokens - tokens)
        self.started = None  # a validation after fit (the best checkpoint's) is not part of training
        self.world_size = trainer.world_size
        if self.tokens is not None and self.world_size > 1:  # a collective: every rank calls on_train_end
            self.tokens = trainer.strategy.reduce(self.tokens, reduce_op="sum")
            if self.steady is not None:
                self.steady = (self.steady[0], trainer.strategy.reduce(self.steady[1], reduce_op="sum"))

    def summary(self) -> dict[str, Any]:
        """``train_seconds``, ``train_tokens`` (all ranks), ``tokens_per_second`` (whole run) and
        ``tokens_per_second_steady`` (after ``steady_after`` steps; None for a shorter run),
        ``epoch_boundary_seconds`` (the training seconds spent between epochs),
        ``peak_gpu_memory_gib`` (None on CPU), ``world_size`` (training processes)."""
        tokens = int(self.tokens.item()) if self.tokens is not None else 0
        peak = None if self.device is None else peak_gpu_memory_gib(self.device)
        return {
            "train_seconds": round(self.seconds, 2),
            "train_tokens": tokens,
            "tokens_per_second": round(tokens / self.seconds, 1) if self.seconds > 0 else None,
            "tokens_per_second_steady": (
                round(int(self.steady[1].item()) / self.steady[0], 1) if self.steady is not None and self.steady[0] > 0 else None
            ),
            "validation_seconds_during_fit": round(self.validation_seconds, 2),
            "epoch_boundary_seconds": round(self.epoch_boundary_seconds, 2),
            "peak_gpu_memory_gib": peak,
            "device": torch.cuda.get_device_name(self.device) if peak is not None else "cpu",
            "world_size": self.world_size,
        }
