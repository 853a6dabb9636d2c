"""Read what a run directory holds for the report: plain data, no drawing and no HTML.

Every part is optional: a run that stopped after ``prepare`` still gets a report, whose other sections say
what is missing. Only files the stages themselves write are read (manifests, ``metrics.json``,
``assign-sids/report.json``, Lightning's ``metrics.csv``), so the report never recomputes a figure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from mmrec.artifacts import Manifest
from mmrec.data.prepared import PreparedData
from mmrec.errors import MMRecError

T = TypeVar("T")


@dataclass(frozen=True)
class Dataset:
    """The prepared data: counts, interactions per split, history lengths, and prepare's own summary."""

    source: str
    counts: dict[str, int]
    splits: dict[str, int]
    history_lengths: np.ndarray
    prepare_extra: dict[str, Any]


@dataclass(frozen=True)
class TestResult:
    """One ``<run_dir>/test/<name>/metrics.json``."""

    name: str
    document: dict[str, Any]


@dataclass(frozen=True)
class TrainingStage:
    """A stage folder that trained something: its manifest's ``extra`` and its logged curves, if any."""

    name: str
    extra: dict[str, Any]
    curves: pd.DataFrame | None
    curves_path: Path | None


@dataclass(frozen=True)
class SIDReport:
    """``assign-sids/report.json`` (per modality: code usage per level, collisions, distance preservation)
    and the usage plot assign-sids drew beside it, if matplotlib was installed then."""

    report: dict[str, dict[str, Any]]
    png: Path | None


@dataclass
class Run:
    """Everything the report shows; None or empty where the run lacks that part. ``problems`` lists parts
    that exist but could not be read, each as one line."""

    path: Path
    dataset: Dataset | None = None
    tests: list[TestResult] = field(default_factory=list)
    sids: SIDReport | None = None
    training: list[TrainingStage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_dataset(run_dir: Path) -> Dataset:
    prepared = PreparedData(run_dir)
    interactions = prepared.interactions
    splits = pd.Series(interactions.column("split").to_numpy(zero_copy_only=False)).value_counts()
    extra = prepared.manifest.extra or {}
    return Dataset(
        source=str(extra.get("source") or prepared.manifest.config.get("source") or "?"),
        counts={"users": prepared.num_users, "items": prepared.num_items, "interactions": interactions.num_rows},
        splits={name: int(splits.get(name, 0)) for name in ("train", "valid", "test")},
        history_lengths=np.array([len(s) for s in prepared.sequences]),
        prepare_extra=extra,
    )


def read_tests(run_dir: Path) -> list[TestResult]:
    return [
        TestResult(path.parent.name, json.loads(path.read_text()))
        for path in sorted((run_dir / "test").glob("*/metrics.json"))
    ]


def latest_curves(work: Path) -> Path | None:
    """The newest CSVLogger ``metrics.csv`` under a stage's work folder (a rerun logs a new version)."""
    found = [p for p in work.glob("**/metrics.csv") if p.is_file()]
    if not found:
        return None

    def version(path: Path) -> tuple[int, float]:
        match = re.fullmatch(r"version_(\d+)", path.parent.name)
        return (int(match.group(1)) if match else -1, path.stat().st_mtime)

    return max(found, key=version)


def read_training(run_dir: Path) -> list[TrainingStage]:
    """Stage folders whose manifest records a fit (``epochs`` in ``extra``), with ``<folder>.work``'s curves."""
    stages = []
    for manifest_path in sorted(run_dir.glob("*/manifest.json")):
        folder = manifest_path.parent
        extra = Manifest.read(folder).extra or {}
        if "epochs" not in extra:
            continue
        csv = latest_curves(run_dir / f"{folder.name}.work")
        curves = pd.read_csv(csv) if csv is not None else None
        stages.append(TrainingStage(folder.name, extra, curves, csv))
    return stages


def read_sids(run_dir: Path) -> SIDReport | None:
    folder = run_dir / "assign-sids"
    if not (folder / "report.json").is_file():
        return None
    png = folder / "report.png"
    return SIDReport(json.loads((folder / "report.json").read_text()), png if png.is_file() else None)


def collect(run_dir: str | Path) -> Run:
    """Read every part of the run that exists; a part that fails to read becomes one line in ``problems``."""
    path = Path(run_dir)
    if not path.is_dir():
        raise MMRecError(f"{path}: run directory not found")
    run = Run(path)

    def attempt(part: str, read: Callable[[], T]) -> T | None:
        try:
            return read()
        except (MMRecError, OSError, ValueError, KeyError) as exc:
            run.problems.append(f"{part}: {exc}")
            return None

    run.dataset = attempt("prepare", lambda: read_dataset(path) if (path / "prepare").is_dir() else None)
    run.tests = attempt("test", lambda: read_tests(path)) or []
    run.sids = attempt("assign-sids", lambda: read_sids(path))
    run.training = attempt("training curves", lambda: read_training(path)) or []
    return run
