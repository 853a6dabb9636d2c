"""The steps of a pipeline YAML: one ``mmrec <stage>`` command line each, in the order the file lists them.

A pipeline names its steps (``stages:``, a mapping kept in file order); a step runs ``stage`` (by default its
name) with its config files and dotted overrides, exactly as typed by hand, plus ``--run_dir``. A ``test``
step with ``models:`` becomes one step per model (``test/fusion``, ...), so each model's evaluation is up to
date or stale on its own: retraining the fusion head re-evaluates the fusion head only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmrec.errors import InputError

PIPELINE = "pipeline"


@dataclass(frozen=True)
class StepSpec:
    """One entry of ``stages:`` in a pipeline YAML.

    Args:
        stage: the mmrec stage to run; null: the entry's own name (``fit-collab: {...}``).
        config: the stage's config file(s), paths relative to the working directory as for the stage itself.
        args: dotted overrides, ``{trainer.max_epochs: 5}``: each becomes ``--trainer.max_epochs 5``.
        models: for ``test`` only: evaluate each of these models (one step per model).
    """

    stage: str | None = None
    config: str | list[str] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Step:
    """One command of the pipeline: its name (for ``--force`` / ``--until``), group and command line."""

    name: str
    group: str
    stage: str
    configs: tuple[Path, ...]
    argv: tuple[str, ...]


def expand(stages: dict[str, StepSpec], run_dir: str, known: list[str]) -> list[Step]:
    """The pipeline's steps in order, each with its full ``mmrec`` command line; fail on what cannot run."""
    if not stages:
        raise InputError("stages: the pipeline names no stage")
    steps: list[Step] = []
    for name, spec in stages.items():
        stage = spec.stage or name
        if stage not in known or stage == PIPELINE:
            raise InputError(f"stages.{name}: unknown stage '{stage}'; expected one of {', '.join(known)}")
        if spec.models and stage != "test":
            raise InputError(f"stages.{name}: models: is for the test stage, not {stage}")
        configs = tuple(Path(path) for path in ([spec.config] if isinstance(spec.config, str) else spec.config))
        for path in configs:
            if not path.is_file():
                raise InputError(f"stages.{name}: config file {path} does not exist")
        overrides = [token for key, value in spec.args.items() for token in (f"--{key}", render(value))]
        argv = [stage, *(token for path in configs for token in ("--config", str(path))), *overrides]
        for model in spec.models or [None]:
            model_args = [] if model is None else ["--model", model]
            steps.append(Step(
                name=name if model is None else f"{name}/{model}", group=name, stage=stage, configs=configs,
                argv=(*argv, *model_args, "--run_dir", run_dir),
            ))
    return steps


def render(value: Any) -> str:
    """A YAML value as the command line takes it: strings as they are, everything else as JSON (which the
    stages' parsers read: ``[collab, text]``, ``true``, ``null``)."""
    return value if isinstance(value, str) else json.dumps(value)


def select(steps: list[Step], names: list[str], option: str) -> set[str]:
    """The step names that ``names`` mean: a step's own name or its group's (``test``: every model's test)."""
    chosen = {step.name for step in steps if step.name in names or step.group in names}
    unknown = [name for name in names if not any(name in (step.name, step.group) for step in steps)]
    if unknown:
        raise InputError(f"{option}: no step named {', '.join(unknown)}; the steps are {', '.join(s.name for s in steps)}")
    return chosen
