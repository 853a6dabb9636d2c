"""``mmrec report``: one self-contained ``<run_dir>/report.html`` of everything the run holds.

Dataset summary, every tested model's metrics beside its protocol, slices where ``mmrec test`` recorded
them, SID usage and collisions, training and validation curves (the CSVLogger that training stages use
unless a config turns logging off) and throughput. Figures need matplotlib, the ``plot`` extra.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import auto_cli

from mmrec.artifacts.stage_output import atomic_file
from mmrec.reporting.collect import collect
from mmrec.reporting.figures import require_matplotlib
from mmrec.reporting.html import render

REPORT = "report.html"


def report(run_dir: str = "runs/demo", output: str | None = None) -> Path:
    """Write the run's HTML report; figures are embedded, so the file opens anywhere without network.

    Args:
        run_dir: run directory to report on.
        output: where to write the page (default: <run_dir>/report.html), atomically.
    """
    require_matplotlib()
    run = collect(run_dir)
    page = render(run)
    path = Path(output) if output else Path(run_dir) / REPORT
    with atomic_file(path) as partial:
        partial.write_text(page, encoding="utf-8")
    for line in run.problems:
        print(f"report: could not read {line}")
    print(f"report: wrote {path} ({len(page) / 1024:.0f} KiB; {len(run.tests)} tested models, {len(run.training)} trained stages)")
    return path


def main(argv: list[str]) -> None:
    auto_cli(report, args=argv, as_positional=False, prog="mmrec report")
