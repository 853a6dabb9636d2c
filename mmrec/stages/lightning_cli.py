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

Stages that train and publish are a :class:`TrainingStageCLI`: its :meth:`~TrainingStageCLI.run` is the one
sequence fit -> best checkpoint -> validate -> manifest -> export, and a stage file declares only its links,
the metric its best checkpoint is chosen on, and what it records and publishes (the hooks ``record_inputs``,
``summary``, ``publish`` and ``report``).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy

from mmrec.artifacts import Manifest, stage_output, work_dir
from mmrec.errors import InputError, MMRecError
from mmrec.stages.resume import (
    PARTIAL_SUFFIX,
    AtomicCheckpointIO,
    BackgroundCheckpointIO,
    LoaderPosition,
    MidEpochCheckpoint,
    RNGState,
)

DEFAULT_SEED = 42
DEFAULT_CHECKPOINT_EVERY_N_STEPS = 500

# `mmrec` passes the stage's own arguments through `args=`; LightningCLI warns whenever sys.argv is not
# empty too, which under the dispatcher it always is.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
# validation metrics are torchmetrics whose compute() already reduces over ranks; Lightning cannot tell and
# recommends sync_dist for every epoch-level value logged under DDP
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")


def class_path(cls: type) -> str:
    """``module.Class``: names apart classes of one name (Lightning's FSDPStrategy and mmrec's)."""
    return f"{cls.__module__}.{cls.__qualname__}"


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
        if config.trainer.logger in (None, True):  # unset or default: CSV curves in the work folder, which `mmrec report` plots
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
            if config.model_checkpoint.save_last == "link":
                raise InputError(
                    "model_checkpoint.save_last: link is not supported (checkpoints are written in the background, "
                    "and the link would be made before its file); use true"
                )
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

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does, but let mmrec's own errors out as they are: jsonargparse wraps an
        error raised while it computes a link (a model's inputs: missing SIDs, no teacher to distil from, a bad
        option) in a ValueError, which would print as a traceback instead of one line."""
        try:
            super().instantiate_classes()
        except ValueError as exc:
            if isinstance(exc.__cause__, MMRecError):
                raise exc.__cause__ from None
            raise

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
                f"trainer.strategy: {class_path(type(strategy))} is not supported; mmrec {self.stage} trains with "
                + ", ".join(cls.__name__ if cls.__module__.startswith("lightning.") else class_path(cls) for cls in self.strategies)
            )
        if trainer.accelerator.__class__.__name__ == "CPUAccelerator":
            if isinstance(strategy, FSDPStrategy):  # Lightning checks its own class only, not a subclass
                raise InputError("trainer.strategy: FSDP needs GPUs (--trainer.accelerator gpu); on the CPU use ddp")
            cores = len(os.sched_getaffinity(0))
            if trainer.num_devices > cores:
                raise InputError(f"trainer.devices: {trainer.num_devices} CPU processes requested, this machine has {cores} cores")
        return trainer

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default; a configured plugin is kept
            strategy.checkpoint_io = BackgroundCheckpointIO(AtomicCheckpointIO())

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
        """What every training stage's manifest records about its fit (``extra``); ``checkpoint_staging_s`` is
        the training thread's time spent copying checkpoints for their background writes."""
        checkpoint_io = self.trainer.strategy.checkpoint_io
        staging = checkpoint_io.staging_seconds if isinstance(checkpoint_io, BackgroundCheckpointIO) else None
        return {
            "best_val": {name.removeprefix("val/"): value for name, value in best_val.items()},
            "best_checkpoint": self.best_checkpoint or None,
            "epochs": self.trainer.current_epoch,
            "global_steps": self.trainer.global_step,
            "fit_wall_time_s": round(fit_seconds, 2),
            "checkpoint_staging_s": None if staging is None else round(staging, 2),
            "resumed_from": resumed_from,
        }

    def fit(self) -> tuple[str | None, float]:
        """Fit the stage's model, from ``last.ckpt`` when resuming; return that path (or None) and the wall time.

        Checkpoints are loaded with ``weights_only=True``: resuming never unpickles arbitrary objects.
        """
        resumed_from = self.start_from()
        start = time.perf_counter()
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=resumed_from, weights_only=True)
        # rank 0 writes checkpoints in the background and waits for the last write here (Lightning's teardown
        # waits too, but not FSDP's); no other rank may read the best checkpoint before that
        checkpoint_io = self.trainer.strategy.checkpoint_io
        if isinstance(checkpoint_io, BackgroundCheckpointIO):
            checkpoint_io.wait()
        self.trainer.strategy.barrier("checkpoints written")
        return resumed_from, time.perf_counter() - start


@dataclass
class FitResult:
    """What :meth:`TrainingStageCLI.run` hands the stage's hooks after fitting and validating."""

    resumed_from: str | None
    """The ``last.ckpt`` training resumed from, None for a fresh run."""
    seconds: float
    """Wall time of ``trainer.fit``."""
    best_val: dict[str, float] = field(default_factory=dict)
    """Validation metrics of the best checkpoint (empty when the stage chooses no best checkpoint)."""


class TrainingStageCLI(StageCLI):
    """A StageCLI that trains one model and publishes it: :meth:`run` is fit -> best checkpoint -> validate ->
    manifest -> export, the same for every training stage.

    Checkpoints: a configurable ``model_checkpoint`` (Lightning's ModelCheckpoint) writing to
    ``<run_dir>/<work_name>.work/checkpoints`` unless ``model_checkpoint.dirpath`` is given, keeping
    ``last.ckpt`` (what ``--resume true`` continues from). With :attr:`monitor` set it also keeps the
    checkpoint with the highest value of that metric, which is validated again after training and published;
    without, the model as training ends is published, not validated again.

    Which processes run what: fitting, validation and :meth:`gather` (collectives, such as the strategy's full
    state dict) run on every rank; the manifest, the export and the printed summary on rank 0 only.
    """

    monitor: str | None = None
    """Validation metric (maximised) that the best checkpoint is chosen on; None keeps ``last.ckpt`` only."""
    checkpoint_filename: str = "best-{epoch}"
    """Default ``model_checkpoint.filename``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(ModelCheckpoint, "model_checkpoint")
        defaults: dict[str, Any] = {"model_checkpoint.save_last": True, "model_checkpoint.filename": self.checkpoint_filename}
        if self.monitor is not None:
            defaults |= {"model_checkpoint.monitor": self.monitor, "model_checkpoint.mode": "max"}
        parser.set_defaults(defaults)

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        if self.config.model_checkpoint.dirpath is None:
            self.config.model_checkpoint.dirpath = str(self.checkpoint_dir)

    @property
    def output_name(self) -> str:
        """Name of the ``<run_dir>/<name>`` folder the stage publishes."""
        return self.stage

    def run(self) -> None:
        """Fit (from ``last.ckpt`` when resuming), validate the best checkpoint, gather what the export needs,
        then on rank 0 write the manifest and the export atomically to ``<run_dir>/<output_name>`` and print
        the summary."""
        resumed_from, seconds = self.fit()
        result = FitResult(resumed_from, seconds, self.validate_best() if self.monitor is not None else {})
        self.gather()
        if not self.trainer.is_global_zero:
            return
        manifest = self.manifest()
        self.record_inputs(manifest)
        manifest.extra = self.summary(result)
        with stage_output(self.run_dir, self.output_name, manifest) as out:
            self.publish(out, manifest)
        self.report(result)

    def validate_best(self) -> dict[str, float]:
        """Validation metrics of the best checkpoint, on every rank. The strategy loads it into the model
        however it holds it (one device, DDP replicas, FSDP shards), with ``weights_only=True``."""
        best = self.best_checkpoint or None
        return self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]

    def gather(self) -> None:
        """Run on every rank after validation: collectives whose result the export needs."""

    def record_inputs(self, manifest: Manifest) -> None:
        """Add the files the stage trained on to ``manifest`` (rank 0)."""

    def summary(self, result: FitResult) -> dict[str, Any]:
        """The manifest's ``extra`` (rank 0): :meth:`fit_summary` unless the stage records more or other."""
        return self.fit_summary(result.best_val, result.resumed_from, result.seconds)

    def publish(self, out: Path, manifest: Manifest) -> None:
        """Write the stage's files into the temporary folder ``out`` and add them to ``manifest`` (rank 0)."""
        raise NotImplementedError

    def report(self, result: FitResult) -> None:
        """The printed summary line (rank 0)."""
        print(
            f"{self.stage}: best {self.monitor} = {result.best_val.get(self.monitor, float('nan')):.4f} "
            f"after {self.trainer.current_epoch} epochs ({result.seconds:.0f} s); wrote {self.run_dir / self.output_name}"
        )
