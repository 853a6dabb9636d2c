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

import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser

from mmrec.artifacts import stage_output
from mmrec.artifacts.exports import read_lightning_checkpoint, save_sasrec
from mmrec.data.datamodules import SequenceDataModule
from mmrec.models.sasrec import MONITOR, STAGE, SASRec
from mmrec.stages.lightning_cli import StageCLI


class FitCollabCLI(StageCLI):
    """StageCLI plus the links SASRec needs and the checkpoint/early-stopping callbacks, configurable."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.max_len", "model.max_len")
        parser.link_arguments("data.num_items", "model.num_items", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "model_checkpoint")
        parser.set_defaults({
            "model_checkpoint.monitor": MONITOR, "model_checkpoint.mode": "max",
            "model_checkpoint.save_last": True, "model_checkpoint.filename": "best-{epoch}",
        })
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        # checked after each validation: on a resumed epoch whose validation already ran, a check at the
        # end of the training epoch would find no metric
        parser.set_defaults({
            "early_stopping.monitor": MONITOR, "early_stopping.mode": "max", "early_stopping.patience": 10,
            "early_stopping.check_on_train_epoch_end": False,
        })

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        if self.config.model_checkpoint.dirpath is None:
            self.config.model_checkpoint.dirpath = str(self.checkpoint_dir)


def peak_gpu_memory_gib(device: torch.device) -> float | None:
    """The process's peak allocated GPU memory on ``device`` (GiB), None off a GPU: what a benchmark reports."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def main(argv: list[str]) -> None:
    cli = FitCollabCLI(STAGE, SASRec, SequenceDataModule, argv, description="Train SASRec and export its item embeddings as the collab modality.")
    trainer, data = cli.trainer, cli.datamodule
    resumed_from, fit_seconds = cli.fit()

    best = cli.best_checkpoint
    model = SASRec.from_state(*read_lightning_checkpoint(Path(best))) if best else cli.model
    best_val = trainer.validate(model, datamodule=data, verbose=False)[0]
    if not trainer.is_global_zero:
        return

    prepared = data.prepared
    manifest = cli.manifest()
    manifest.add_input("interactions", prepared.interactions_path, prepared.manifest)
    manifest.extra = {
        **cli.fit_summary(best_val, resumed_from, fit_seconds),
        "stopped_early": bool(trainer.early_stopping_callback and trainer.early_stopping_callback.stopped_epoch),
        "peak_gpu_memory_gib": peak_gpu_memory_gib(trainer.strategy.root_device),
    }
    with stage_output(cli.run_dir, STAGE, manifest) as out:
        for name, path in save_sasrec(model, out).items():
            manifest.add_output(name, path, rows=prepared.num_items if name == "emb_collab" else None)
    print(
        f"fit-collab: best {MONITOR} = {best_val.get(MONITOR, float('nan')):.4f} "
        f"after {trainer.current_epoch} epochs ({fit_seconds:.0f} s); wrote {cli.run_dir / STAGE}"
    )
