"""``mmrec pipeline``: run the stages one YAML names, in order, skipping those already up to date.

Wiring only. Each step runs as its own ``mmrec <stage>`` process (:mod:`mmrec.pipeline.runner` says why
a process each, and why from a fork server), so it writes the same artifacts and manifests as by hand. A
step whose command, config files and inputs are unchanged since the pipeline last ran it is skipped with
"<step>: up to date" (:mod:`mmrec.pipeline.state`); a failing step stops the pipeline with its one-line error
and leaves every finished stage folder as it was. The run ends with one table of every model the pipeline tested.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from mmrec.cli import STAGES
from mmrec.errors import InputError
from mmrec.pipeline.comparison import comparison_table
from mmrec.pipeline.runner import Outcome, run_stage
from mmrec.pipeline.state import PipelineState, manifests
from mmrec.pipeline.steps import Step, StepSpec, expand, select
from mmrec.stages.arguments import one_line, parse_or_refuse, stage_parser


def pipeline(
    stages: dict[str, StepSpec],
    run_dir: str = "runs/demo",
    force: list[str] | None = None,
    until: str | None = None,
    verbose: bool = False,
    fork: bool = True,
) -> None:
    """Run the named stages in order; those already up to date are skipped.

    Args:
        stages: step name -> {stage, config, args, models}, in the order to run them.
        run_dir: run directory passed to every stage (``--run_dir``).
        force: steps to run even when up to date (a group name, e.g. ``test``, forces all its models); what
            reads them runs again too.
        until: stop after this step (or the last step of this group).
        verbose: show every library message (sets MMREC_VERBOSE=1 for the stages).
        fork: start each stage from a fork server that imports the stage modules once (Linux; see
            :mod:`mmrec.pipeline.runner`); false: a fresh interpreter per stage, as by hand.
    """
    steps = expand(stages, run_dir, list(STAGES))
    forced = select(steps, force or [], "--force")
    if until is not None:
        last = select(steps, [until], "--until")
        steps = steps[: max(i for i, step in enumerate(steps) if step.name in last) + 1]
    root = Path(run_dir)
    state = PipelineState(root)
    for step in steps:
        before = manifests(root)
        reason = "forced" if step.name in forced else state.stale(step, before)
        if reason is None:
            print(f"{step.name}: up to date", flush=True)
            continue
        print(f"{step.name}: running ({reason}): mmrec {' '.join(step.argv)}", flush=True)
        outcome = run_stage(list(step.argv), verbose, fork)
        if outcome.returncode != 0:
            raise InputError(f"{step.name}: {failure(step, outcome)}")
        state.record(step, before)
    documents = [tested for step in steps if step.stage == "test" and (tested := metrics_of(root, state, step))]
    if documents:
        print(f"\nmodels tested in {root}:\n{comparison_table(documents)}", flush=True)


def failure(step: Step, outcome: Outcome) -> str:
    """The failed stage's own one-line error without its ``mmrec <stage>: error:`` prefix, else its exit code
    and last line (a crash's exception, after the traceback it printed)."""
    prefix = f"mmrec {step.stage}: error: "
    line = outcome.last_error_line
    if line.startswith(prefix):
        return line[len(prefix):]
    return f"exited with code {outcome.returncode}" + (f": {one_line(line)}" if line else "")


def metrics_of(root: Path, state: PipelineState, step: Step) -> dict[str, Any] | None:
    """The ``metrics.json`` a test step wrote, or None (not run yet, or unreadable)."""
    record = state.records.get(step.name)
    try:
        return json.loads((root / record.folder / "metrics.json").read_text()) if record else None
    except (OSError, ValueError):
        return None


def build_parser() -> ArgumentParser:
    parser = stage_parser(
        "pipeline",
        "Run the stages a pipeline YAML names, in order, skipping those already up to date "
        "(same command, config files and inputs as when the pipeline last ran them).",
        config_help="the pipeline YAML (repeatable; later wins)",
    )
    parser.add_function_arguments(pipeline, as_group=False, skip={"force", "until", "verbose"})
    parser.add_argument("--force", nargs="+", default=[], metavar="STEP",
                        help="run these steps (or groups, e.g. test) even when up to date; what reads them runs too")
    parser.add_argument("--until", type=str, default=None, metavar="STEP", help="stop after this step")
    parser.add_argument("--verbose", action="store_true", help="show every library message, tips and deprecations included")
    return parser


def main(argv: list[str]) -> None:
    parser = build_parser()
    config = parse_or_refuse(parser, argv, "pipeline")
    init = parser.instantiate_classes(config)
    pipeline(init.stages, init.run_dir, init.force, init.until, init.verbose, init.fork)
