"""The pipeline's stage runner (:mod:`mmrec.pipeline.runner`): a fork of the driver and a fresh interpreter
end a stage the same way; a forked stage under DDP starts its other rank as ``python -m mmrec.cli <stage>``
whatever the driver's own command line (here pytest's); the driver falls back to a fresh interpreter once
CUDA is initialised in it, and where it runs with ``--verbose``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mmrec.artifacts import Manifest
from mmrec.pipeline import runner
from tests.fixtures import make_prepared_run

CONF = Path(__file__).resolve().parent / "conf"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stages fork on Linux only")


def test_a_fork_and_a_fresh_interpreter_end_a_failing_stage_alike(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    argv = ["test", "--run_dir", str(tmp_path / "missing"), "--model", "sasrec"]
    forked, fresh = runner.run_stage(argv, verbose=False), runner.run_stage(argv, verbose=False, fork=False)
    assert forked == fresh
    assert forked.returncode == 2 and forked.last_error_line.startswith("mmrec test: error: ")
    assert "no manifest" in forked.last_error_line
    assert "mmrec test: error" not in capfd.readouterr().err  # the last line is the driver's to report, not echoed


@pytest.mark.usefixtures("single_thread")
def test_a_forked_stage_runs_its_ddp_ranks_as_the_stage_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's launcher re-executes ``__main__`` with ``sys.argv``: pytest's here, unless the child
    presents itself as ``mmrec.cli``; with pytest's, rank 1 would run the test session and never join."""
    run = make_prepared_run(tmp_path / "run")
    monkeypatch.setattr(sys, "argv", ["pytest", "--not-a-stage-option"])
    outcome = runner.run_stage(["fit-collab", "--config", str(CONF / "fit-collab.yaml"), "--run_dir", str(run),
                                "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"], False)
    assert outcome.returncode == 0, outcome
    assert Manifest.read(run / "fit-collab").stage == "fit-collab"
    assert sys.argv == ["pytest", "--not-a-stage-option"]  # the driver's own state is untouched


@pytest.mark.parametrize("reason", ["cuda initialised here", "no cuda in a fork", "verbose", "asked"])
def test_the_driver_starts_a_fresh_interpreter_where_a_fork_cannot_serve(reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    monkeypatch.setattr(runner, "_run_interpreter", lambda argv, verbose: started.append("interpreter") or runner.Outcome(0, ""))
    monkeypatch.setattr(runner, "_run_fork", lambda argv: started.append("fork") or runner.Outcome(0, ""))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: reason == "cuda initialised here")
    monkeypatch.setattr(runner, "forks_reach_cuda", lambda: reason != "no cuda in a fork")
    runner.run_stage(["test", "--help"], verbose=reason == "verbose", fork=reason != "asked")
    runner.run_stage(["test", "--help"], verbose=False)
    assert started == ["interpreter", "fork" if reason in ("verbose", "asked") else "interpreter"]


def test_a_fork_that_cannot_reach_the_gpus_is_found_by_a_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver that sees GPUs asks a throwaway fork to use one; this CPU build cannot, so the probe says no."""
    runner.forks_reach_cuda.cache_clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    try:
        assert runner.forks_reach_cuda() is torch.cuda.is_available()
    finally:
        runner.forks_reach_cuda.cache_clear()
