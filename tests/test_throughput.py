"""TrainingThroughput: tokens counted per step, validation time kept out of the training time, and a
validation after ``fit`` (the stages validate their best checkpoint) not charged to the fit."""

from __future__ import annotations

import time

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from mmrec.callbacks.throughput import TrainingThroughput

VALIDATION_PAUSE_S = 0.5


class Counted(L.LightningModule):
    """A linear model whose batches hold 3 tokens per row, and whose validation steps take a known time."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def tokens_in(self, batch: list[Tensor]) -> Tensor:
        return torch.tensor(3 * len(batch[0]))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        time.sleep(VALIDATION_PAUSE_S)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_tokens_and_seconds_leave_out_validation_inside_and_after_fit() -> None:
    loader = DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=4)  # 2 steps an epoch
    meter = TrainingThroughput(steady_after=1)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", callbacks=[meter], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1)
    model = Counted()
    trainer.fit(model, loader, loader)
    trainer.validate(model, loader, verbose=False)  # what a stage does with its best checkpoint
    summary = meter.summary()
    assert summary["train_tokens"] == 2 * 2 * 4 * 3
    assert 2 * VALIDATION_PAUSE_S <= summary["validation_seconds_during_fit"] < 2.5 * VALIDATION_PAUSE_S
    assert summary["train_seconds"] < 1.8 * VALIDATION_PAUSE_S  # with the two passes in it, 2 x the pause or more
    assert summary["tokens_per_second_steady"] is not None and summary["world_size"] == 1


class PauseBetweenEpochs(L.Callback):
    """Costs the training thread a known time after each validation, as a checkpoint copy does."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            time.sleep(BOUNDARY_PAUSE_S)


BOUNDARY_PAUSE_S = 0.3


def test_the_time_between_epochs_is_reported_without_the_validation_in_it() -> None:
    loader = DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=4)
    meter = TrainingThroughput(steady_after=1)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", callbacks=[meter, PauseBetweenEpochs()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(Counted(), loader, loader)
    summary = meter.summary()
    # three pauses (the last epoch's too), none of the three 0.5-s validation passes
    assert 3 * BOUNDARY_PAUSE_S <= summary["epoch_boundary_seconds"] < 3 * BOUNDARY_PAUSE_S + VALIDATION_PAUSE_S
    assert summary["epoch_boundary_seconds"] <= summary["train_seconds"]
