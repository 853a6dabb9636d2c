"""``mmrec fit-collab``: train SASRec on the run's training interactions and export its item embeddings.

Wiring only: the model is :class:`mmrec.models.sasrec.SASRec`, the data ``SequenceDataModule``
(``shifted`` mode), the metric :class:`mmrec.metrics.ranking.RankingMetrics` on the validation split.
Checkpoints are chosen on ``val/ndcg@10`` with early stopping; they live in
``<run_dir>/fit-collab.work/checkpoints`` (``last.ckpt`` there is what ``--resume true`` continues from).
The best checkpoint is then exported, atomically, to ``<run_dir>/fit-collab/``: ``sasrec.safetensors``,
``sasrec.json`` and ``emb_collab.parquet`` (the ``collab`` modality that ``fit-quantizer`` reads), with a
manifest recording the interactions they were trained on and the best validation metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import LightningArgumentParser

from mmrec.artifacts import Manifest
from mmrec.artifacts.exports import read_lightning_checkpoint, save_sasrec
from mmrec.callbacks.throughput import peak_gpu_memory_gib
from mmrec.data.datamodules import SequenceDataModule
from mmrec.models.sasrec import MONITOR, STAGE, SASRec
from mmrec.stages.lightning_cli import FitResult, TrainingStageCLI


class FitCollabCLI(TrainingStageCLI):
    """TrainingStageCLI plus the links SASRec needs and an early-stopping callback, configurable."""

    monitor = MONITOR

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.max_len", "model.max_len")
        parser.link_arguments("data.num_items", "model.num_items", apply_on="instantiate")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        # checked after each validation: on a resumed epoch whose validation already ran, a check at the
        # end of the training epoch would find no metric
        parser.set_defaults({
            "early_stopping.monitor": MONITOR, "early_stopping.mode": "max", "early_stopping.patience": 10,
            "early_stopping.check_on_train_epoch_end": False,
        })

    def validate_best(self) -> dict[str, float]:
        """The best checkpoint, read into a fresh SASRec (the model exported), validated."""
        best = self.best_checkpoint
        self.best_model = SASRec.from_state(*read_lightning_checkpoint(Path(best))) if best else self.model
        return self.trainer.validate(self.best_model, datamodule=self.datamodule, verbose=False)[0]

    def record_inputs(self, manifest: Manifest) -> None:
        prepared = self.datamodule.prepared
        manifest.add_input("interactions", prepared.interactions_path, prepared.manifest)

    def summary(self, result: FitResult) -> dict[str, Any]:
        trainer = self.trainer
        return {
            **super().summary(result),
            "stopped_early": bool(trainer.early_stopping_callback and trainer.early_stopping_callback.stopped_epoch),
            "peak_gpu_memory_gib": peak_gpu_memory_gib(trainer.strategy.root_device),
        }

    def publish(self, out: Path, manifest: Manifest) -> None:
        for name, path in save_sasrec(self.best_model, out, self.datamodule.prepared.train_item_counts > 0).items():
            manifest.add_output(name, path, rows=self.datamodule.prepared.num_items if name == "emb_collab" else None)


def main(argv: list[str]) -> None:
    FitCollabCLI(STAGE, SASRec, SequenceDataModule, argv, description="Train SASRec and export its item embeddings as the collab modality.").run()
