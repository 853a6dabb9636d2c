"""The callbacks that make a training stage killed at any step resume to the same result.

Lightning's checkpoint already holds the weights, the optimizer and scheduler states, the loop counters and
(see :mod:`mmrec.data.resumable`) the training loader's position. What is missing:

* :class:`RNGState` saves the random streams (torch, CUDA, NumPy, Python; under DDP every rank's) so that
  dropout, negative sampling and the quantizer's re-seeding draw after a resume what they would have drawn
  without the interruption;
* :class:`MidEpochCheckpoint` writes ``last.ckpt`` every ``n`` training steps, so that a kill loses at most
  ``n`` steps instead of the whole epoch (the stages' own checkpoints are written after validation only);
* :class:`LoaderPosition` hands the saved loader position to the loader when Lightning itself does not
  (when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``, as the LLM recommender's
  schedule does);
* :class:`AtomicCheckpointIO` makes a kill while a checkpoint is being written leave the previous one
  whole, wherever the run directory is;
* :class:`BackgroundCheckpointIO` writes checkpoints beside training instead of in its way (a fully
  fine-tuned LLM head's checkpoint with its optimizer state is some 1.7 GB, written after every validation).

Everything saved is tensors, numbers and strings: checkpoints still load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from mmrec.data.resumable import world
from mmrec.errors import InputError
from mmrec.stages.host_staging import BufferSet, HostStaging

PARTIAL_SUFFIX = ".partial"
"""Suffix of a checkpoint being written; such a file is left only by a kill during the write."""


def rng_state() -> dict[str, Any]:
    """The global random streams as tensors and plain numbers (``weights_only``-loadable)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned; CUDA streams only where this machine has as many devices."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


class RNGState(Callback):
    """Save the global random streams in every checkpoint; restore them when training resumes.

    The streams are restored in ``on_train_start``, not when the checkpoint is read: between the two,
    a resumed run builds its loaders and may run sanity validation, none of which the interrupted run did at
    that point of its stream. ``on_train_start`` is the last hook before the next training batch (or, for a
    checkpoint taken at an epoch's end, before the next ``on_train_epoch_start``) that both runs reach in
    the same state. Callbacks run before the LightningModule's hook of the same name, so the module's
    ``on_train_start`` already sees the restored streams.

    Under DDP each rank has its own streams (dropout masks differ between ranks), but Lightning saves only
    rank 0's checkpoint. ``state_dict`` runs on every rank while the checkpoint is assembled, so there it
    gathers all ranks' streams (``{"ranks": [rank 0's, rank 1's, ...]}``) and each rank restores its own; a
    single process saves its streams as they are. Resuming on another number of processes is refused: the
    loader position (batches per rank) would not mean the same either.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        replicas, _ = world()
        if replicas == 1:
            return rng_state()
        ranks: list[Any] = [None] * replicas
        dist.all_gather_object(ranks, rng_state())
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        replicas, rank = world()
        saved = len(state_dict["ranks"]) if "ranks" in state_dict else 1
        if saved != replicas:
            raise InputError(
                f"the checkpoint was written by {saved} training process(es), this run has {replicas}: resume with "
                "the same --trainer.devices and --trainer.num_nodes"
            )
        self._pending = state_dict["ranks"][rank] if replicas > 1 else state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None


class LoaderPosition(Callback):
    """Load the training loader's saved position even when Lightning skipped it (Lightning issue #20550).

    Lightning loads loader states in ``FitLoop.setup_data``, but only the first time it builds the loader.
    ``trainer.estimated_stepping_batches`` (read in ``configure_optimizers`` to size a schedule) builds it
    before the checkpoint's loop state is read, so the states are never loaded and a resumed run would
    start its epoch over. Lightning's own loading step, run again in ``on_train_start``, loads them then; it
    does nothing when they were already loaded or when the run is not resuming. The loader has not started
    its epoch yet at that point (:class:`mmrec.data.resumable.ResumableDataLoader` reads its position on
    the first batch), so the late load takes effect.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop._load_combined_loader_states()


class MidEpochCheckpoint(ModelCheckpoint):
    """Overwrite ``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimizer steps, and nothing else.

    It keeps no top-k files (``save_top_k=0``) and never versions ``last.ckpt`` around the stage's own
    checkpoint callback, which writes the same file after validation. It skips the last batch of an epoch:
    the stage's callback saves right after that epoch's validation, and a checkpoint from between the two
    would resume into the next epoch without that validation (Lightning counts the epoch as done).
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int) -> None:
        super().__init__(
            dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
    ) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files that appear whole or not at all, on any local file system.

    Lightning's own save writes a checkpoint to the system's temporary folder and moves it into place: a
    rename when both are on one file system, but a copy when the run directory is on another (a network or
    data volume), and a kill during that copy leaves a truncated ``last.ckpt`` that no resume can read.
    This writes the file next to its target (``.<name>.<pid>.partial``), flushes it to disk and renames it
    over the target. Remote paths (``s3://...``) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}{PARTIAL_SUFFIX}")
        try:
            with open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Checkpoints written by one background thread (Lightning's :class:`AsyncCheckpointIO`), with the
    tensors copied to reused host buffers first and every file operation in that thread's order.

    Lightning's plugin copies the tensors where they are: on a GPU that holds a second copy of a fully
    fine-tuned head and its optimizer state (some 1.7 GB, twice when a best and a last checkpoint are saved
    together) until the write ends. Here they go to host buffers that are allocated once, page-locked for GPU
    tensors, and reused (:mod:`mmrec.stages.host_staging`): the training thread pays one fast transfer a
    checkpoint; :attr:`staging_seconds` is what it paid in all. Lightning's plugin also removes a replaced
    top-k checkpoint and reads one at once, in the caller's thread: a removal could overtake the pending write
    of the same file (leaving a stale best checkpoint behind) and a read could see an older file. Here removals
    queue behind the writes, and a read waits for them.
    The stages :meth:`wait` for the last write as ``fit`` ends, then pass a barrier, so that no rank reads
    a checkpoint rank 0 is still writing. Lightning's ``save_last: link`` (a symlink made in the
    training thread) would not be ordered with the writes: the stages refuse it.
    """

    def __init__(self, checkpoint_io: CheckpointIO | None = None, staging: HostStaging | None = None) -> None:
        super().__init__(checkpoint_io)
        self.staging = staging if staging is not None else HostStaging()
        self.staging_seconds = 0.0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        started = time.perf_counter()
        on_host, buffers = self.staging.stage(checkpoint)
        self.staging_seconds += time.perf_counter() - started
        self._queue(self._write_staged, on_host, buffers, path, storage_options)
        self._raise_pending()

    def _write_staged(self, checkpoint: dict[str, Any], buffers: BufferSet, path: str | Path, storage_options: Any | None) -> None:
        try:
            self._writer.save_checkpoint(checkpoint, path, storage_options)
        finally:
            self.staging.release(buffers)

    def remove_checkpoint(self, path: str | Path) -> None:
        self._queue(self._writer.remove_checkpoint, path)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.wait()
        return super().load_checkpoint(*args, **kwargs)

    def teardown(self) -> None:
        """Wait for the writes (Lightning's teardown), then free the host buffers: they would otherwise hold
        some 3.4 GB of page-locked memory through the export and testing."""
        super().teardown()
        self.staging = HostStaging(self.staging.sets)

    def wait(self) -> None:
        """Return once every queued write and removal is done; raise the error of one that failed.

        The stages call it as ``fit`` ends: Lightning's FSDP strategy reads checkpoints itself, past this
        plugin, and its teardown does not call this plugin's (which would wait)."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        self._raise_pending()

    @property
    def _writer(self) -> CheckpointIO:
        """The wrapped plugin, which does the file operations in the background thread."""
        assert self.checkpoint_io is not None
        return self.checkpoint_io

    def _queue(self, operation: Callable[..., None], *args: Any) -> None:
        self._ensure_setup()
        assert self._executor is not None
        self._executor.submit(self._run, operation, *args)

    def _run(self, operation: Callable[..., None], *args: Any) -> None:
        """Run a queued file operation; its error is raised on the caller's next save or read, or at teardown."""
        try:
            operation(*args)
        except BaseException as exc:  # noqa: BLE001 (kept for the caller's thread, as Lightning's plugin does)
            self._error = exc

    def _raise_pending(self) -> None:
        if self._error:
            raise self._error
