"""The LightningCLI that every training stage is built on.

It adds what all mmrec stages share: ``--run_dir`` (linked to ``data.run_dir``), ``--resume``, a seed
default, ``trainer.default_root_dir`` inside ``<run_dir>/<stage>.work`` (checkpoints and logs, kept on a
crash for resuming), a CSVLogger there when the config leaves ``trainer.logger`` unset (the curves that
``mmrec report`` plots, whether or not TensorBoard is installed), and a parser named after the stage so
``--help`` reads ``mmrec <stage>``.

Resuming is exact: a stage killed at any step and restarted with ``--resume true`` ends with the weights and
metrics of an uninterrupted run (same seed, CPU). ``last.ckpt`` is written every
``--checkpoint_every_n_steps`` training steps as well as after each validation, and every checkpoint holds
the random streams (:class:`mmrec.stages.resume.RNGState`) and the training loader's position in its epoch
(:mod:`mmrec.data.resumable`).

Multi-process training: a stage runs on one device or under Lightning's ``ddp`` strategy
(``--trainer.devices N --trainer.strategy ddp``, ``--trainer.num_nodes`` under torchrun or SLURM). The
data modules shard their own loaders (:mod:`mmrec.data.resumable`), every rank's random streams are
checkpointed, and only rank 0 exports. A stage may accept more (``fit-recommender`` also trains under FSDP,
see :attr:`StageCLI.strategies`). Other strategies are refused before any work starts, as are Trainer
settings that Lightning rejects, with the stage's one-line error: spawned or forked workers
(``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) would train in other processes than the one that exports,
and other sharded strategies (DeepSpeed) checkpoint and export in ways the stages do not read.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy

from mmrec.artifacts import Manifest, work_dir
from mmrec.errors import InputError
from mmrec.stages.resume import PARTIAL_SUFFIX, AtomicCheckpointIO, LoaderPosition, MidEpochCheckpoint, RNGState

DEFAULT_SEED = 42
DEFAULT_CHECKPOINT_EVERY_N_STEPS = 500

# `mmrec` passes the stage's own arguments through `args=`; LightningCLI warns whenever sys.argv is not
# empty too, which under the dispatcher it always is.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
# validation metrics are torchmetrics whose compute() already reduces over ranks; Lightning cannot tell and
# recommends sync_dist for every epoch-level value logged under DDP
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")


class StageCLI(LightningCLI):
    """LightningCLI (``run=False``) for one mmrec training stage."""

    strategies: tuple[type[Strategy], ...] = (SingleDeviceStrategy, DDPStrategy)
    """Strategy classes this stage runs under (exact types: DeepSpeed's strategy subclasses DDP's); a stage
    that supports another adds it here."""

    def __init__(
        self,
        stage: str,
        model_class: type[L.LightningModule] | None,
        datamodule_class: type[L.LightningDataModule] | None,
        args: list[str],
        description: str = "",
        **kwargs: Any,
    ) -> None:
        self.stage = stage
        kwargs.setdefault("seed_everything_default", DEFAULT_SEED)
        super().__init__(
            model_class,
            datamodule_class,
            run=False,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": f"mmrec {stage}", "description": description},
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/demo", help="run directory, one folder a stage")
        parser.add_argument(
            "--resume", type=bool, default=False,
            help="continue from <run_dir>/<stage>.work/checkpoints/last.ckpt after a crash or kill; ends where an "
                 "uninterrupted run would have",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps", type=int, default=DEFAULT_CHECKPOINT_EVERY_N_STEPS,
            help="also write last.ckpt every N training steps, so a crash loses at most N steps (0: only after "
                 "validation)",
        )
        parser.link_arguments("run_dir", "data.init_args.run_dir" if self.subclass_mode_data else "data.run_dir")

    def before_instantiate_classes(self) -> None:
        config = self.config
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(work_dir(config.run_dir, self.work_name))
        if config.trainer.logger is None:  # unset: CSV curves in the work folder, which `mmrec report` plots
            config.trainer.logger = {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": config.trainer.default_root_dir, "name": "logs"},
            }
        every = config.checkpoint_every_n_steps
        if every < 0:
            raise InputError(f"checkpoint_every_n_steps must be 0 or more, got {every}")
        # two callbacks write last.ckpt (the stage's after validation, MidEpochCheckpoint between): neither may
        # version its file around the other's (last-v1.ckpt), or --resume would read a stale one
        if config.get("model_checkpoint") is not None:
            config.model_checkpoint.enable_version_counter = False
        # trainer_defaults' callbacks come after the configured ones, so trainer.checkpoint_callback (the
        # first ModelCheckpoint) stays the stage's own
        defaults = self.trainer_defaults.get("callbacks") or []
        resume_callbacks: list[L.Callback] = [RNGState(), LoaderPosition()]
        if every:
            resume_callbacks.append(MidEpochCheckpoint(self.checkpoint_dir, every))
        self.trainer_defaults = {
            **self.trainer_defaults,
            "callbacks": [*(defaults if isinstance(defaults, list) else [defaults]), *resume_callbacks],
        }

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The Trainer, or the stage's one-line error for a setting Lightning rejects or the stage cannot run
        (see the module docstring)."""
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError, ImportError, RuntimeError) as exc:
            raise InputError(f"trainer: {exc}") from None
        strategy = trainer.strategy
        if type(strategy) is DDPStrategy and strategy._start_method != "popen":
            raise InputError(
                f"trainer.strategy: start method {strategy._start_method!r} is not supported; use "
                "--trainer.strategy ddp (or launch with torchrun)"
            )
        if type(strategy) not in self.strategies:
            raise InputError(
                f"trainer.strategy: {type(strategy).__name__} is not supported; mmrec {self.stage} trains with "
                + ", ".join(cls.__name__ for cls in self.strategies)
            )
        if trainer.accelerator.__class__.__name__ == "CPUAccelerator":
            cores = len(os.sched_getaffinity(0))
            if trainer.num_devices > cores:
                raise InputError(f"trainer.devices: {trainer.num_devices} CPU processes requested, this machine has {cores} cores")
        return trainer

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default; a configured plugin is kept
            strategy.checkpoint_io = AtomicCheckpointIO()

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    def manifest(self) -> Manifest:
        """A manifest for this run's output: the stage, the resolved configuration (as JSON) and the seed."""
        config = json.loads(json.dumps(self.config.as_dict(), default=str))
        return Manifest(stage=self.stage, config=config, seed=self.config.seed_everything)

    @property
    def work_name(self) -> str:
        """Name of the ``<run_dir>/<name>.work`` folder holding this run's checkpoints and logs."""
        return self.stage

    @property
    def checkpoint_dir(self) -> Path:
        return work_dir(self.run_dir, self.work_name) / "checkpoints"

    def resume_path(self) -> str | None:
        """``last.ckpt`` when ``--resume`` is set and one exists, else None (train from scratch)."""
        last = self.checkpoint_dir / "last.ckpt"
        return str(last) if self.config.resume and last.is_file() else None

    def start_from(self) -> str | None:
        """The checkpoint to resume from, or None after clearing an earlier run's checkpoints.

        A fresh run must not mix with an earlier run's checkpoints: ModelCheckpoint would version its files
        around them (``last-v1.ckpt``) and a later ``--resume`` would pick the stale ``last.ckpt``. Files a
        kill left half-written (``*.partial``, see ``AtomicCheckpointIO``) are removed either way.
        """
        for partial in self.checkpoint_dir.glob(f".*{PARTIAL_SUFFIX}"):
            partial.unlink()
        if not self.config.resume:
            stale = sorted(self.checkpoint_dir.glob("*.ckpt"))
            for path in stale:
                path.unlink()
            if stale:
                print(f"{self.stage}: removed {len(stale)} checkpoint(s) of an earlier run from {self.checkpoint_dir} "
                      "(--resume true continues one)")
        return self.resume_path()

    @property
    def best_checkpoint(self) -> str:
        """The checkpoint callback's best model path ("" when there is none)."""
        callback = self.trainer.checkpoint_callback
        return callback.best_model_path if callback else ""

    def fit_summary(self, best_val: dict[str, float], resumed_from: str | None, fit_seconds: float) -> dict[str, Any]:
        """What every training stage's manifest records about its fit (``extra``)."""
        return {
            "best_val": {name.removeprefix("val/"): value for name, value in best_val.items()},
            "best_checkpoint": self.best_checkpoint or None,
            "epochs": self.trainer.current_epoch,
            "global_steps": self.trainer.global_step,
            "fit_wall_time_s": round(fit_seconds, 2),
            "resumed_from": resumed_from,
        }

    def fit(self) -> tuple[str | None, float]:
        """Fit the stage's model, from ``last.ckpt`` when resuming; return that path (or None) and the wall time.

        Checkpoints are loaded with ``weights_only=True``: resuming never unpickles arbitrary objects.
        """
        resumed_from = self.start_from()
        start = time.perf_counter()
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=resumed_from, weights_only=True)
        return resumed_from, time.perf_counter() - start
