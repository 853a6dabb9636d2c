"""Atomic publication of a stage's outputs.

A stage writes everything into ``<run_dir>/.<stage>.tmp-<pid>/`` and, only once all its files and its
manifest are written, swaps that folder into ``<run_dir>/<stage>/``. A crash or a bad input therefore
leaves either the previous complete artifact or none, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmrec.artifacts.manifest import Manifest


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage


def work_dir(run_dir: str | Path, stage: str) -> Path:
    """Scratch space that survives a crash on purpose (checkpoints for resuming, logs)."""
    path = Path(run_dir) / f"{stage}.work"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def stage_output(run_dir: str | Path, stage: str, manifest: Manifest) -> Iterator[Path]:
    """Yield a temporary folder; on success write ``manifest`` there and publish it as the stage folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{stage}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        manifest.write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, stage_dir(run_dir, stage))


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed onto ``path`` when the block ends without an error,
    removed otherwise: a reader never sees half a file, and a failure leaves the previous one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def publish(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` with renames only, so readers never see a partial folder."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
