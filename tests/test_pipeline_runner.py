"""The pipeline's stage runner (:mod:`mmrec.pipeline.runner`): a child of the fork server and a fresh interpreter
end a stage the same way; a stage shares no runtime state with the driver; a forked stage runs its DDP ranks as
``python -m mmrec.cli <stage>`` whatever the driver's own command line (here pytest's); the driver starts a
fresh interpreter where asked, with ``--verbose``, and where a fork cannot reach the GPUs."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmrec.artifacts import Manifest
from mmrec.pipeline import runner
from tests.fixtures import make_prepared_run

CONF = Path(__file__).resolve().parent / "conf"
TIMEOUT_S = 180
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stages fork on Linux only")


def test_a_fork_and_a_fresh_interpreter_end_a_failing_stage_alike(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    argv = ["test", "--run_dir", str(tmp_path / "missing"), "--model", "sasrec"]
    forked, fresh = runner.run_stage(argv, verbose=False), runner.run_stage(argv, verbose=False, fork=False)
    assert forked == fresh
    assert forked.returncode == 2 and forked.last_error_line.startswith("mmrec test: error: ")
    assert "no manifest" in forked.last_error_line
    assert "mmrec test: error" not in capfd.readouterr().err  # the last line is the driver's to report, not echoed


def test_a_stage_shares_no_runtime_state_with_the_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage comes from the fork server, not from a fork of this process, so nothing this process did
    reaches it (here a patched stage; in a full test session, a fork of pytest once hung in its first parallel
    op, in OpenMP state it had inherited)."""
    import mmrec.stages.test as test_stage

    monkeypatch.setattr(test_stage, "main", lambda argv: sys.exit(7))
    outcome = runner.run_stage(["test", "--run_dir", str(tmp_path / "missing"), "--model", "sasrec"], False)
    assert outcome.returncode == 2 and "no manifest" in outcome.last_error_line  # the real stage, not 7


def test_a_forked_stage_runs_its_ddp_ranks_as_the_stage_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's launcher re-executes ``__main__`` with ``sys.argv``: pytest's here, unless the child presents
    itself as ``mmrec.cli``; with pytest's, rank 1 would run a test session and never join."""
    run = make_prepared_run(tmp_path / "run")
    monkeypatch.setattr(sys, "argv", ["pytest", "--not-a-stage-option"])
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the forked stage hung"))
    signal.alarm(TIMEOUT_S)
    try:
        outcome = runner.run_stage(["fit-collab", "--config", str(CONF / "fit-collab.yaml"), "--run_dir", str(run),
                                    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"], False)
    finally:
        signal.alarm(0)
    assert outcome.returncode == 0, outcome
    assert Manifest.read(run / "fit-collab").stage == "fit-collab"
    assert sys.argv == ["pytest", "--not-a-stage-option"]  # the driver's own state is untouched


def test_a_forked_stage_starts_its_data_loader_workers_as_a_fresh_interpreter_does(tmp_path: Path) -> None:
    """A child of the fork server inherits its start method, "forkserver", under which a data loader's workers
    cannot start (its iterator does not pickle); the stage resets it, as Beauty's configs (4 workers) need."""
    run = make_prepared_run(tmp_path / "run")
    outcome = runner.run_stage(["fit-collab", "--config", str(CONF / "fit-collab.yaml"), "--run_dir", str(run),
                                "--trainer.accelerator", "cpu", "--data.num_workers", "2"], False)
    assert outcome.returncode == 0, outcome
    assert Manifest.read(run / "fit-collab").stage == "fit-collab"


@pytest.mark.parametrize("reason", ["no cuda in a fork", "verbose", "asked"])
def test_the_driver_starts_a_fresh_interpreter_where_a_fork_cannot_serve(reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    monkeypatch.setattr(runner, "_run_interpreter", lambda argv, verbose: started.append("interpreter") or runner.Outcome(0, ""))
    monkeypatch.setattr(runner, "_run_forked", lambda argv: started.append("fork") or runner.Outcome(0, ""))
    monkeypatch.setattr(runner, "forks_reach_cuda", lambda: reason != "no cuda in a fork")
    runner.run_stage(["test", "--help"], verbose=reason == "verbose", fork=reason != "asked")
    runner.run_stage(["test", "--help"], verbose=False)
    assert started == ["interpreter", "interpreter" if reason == "no cuda in a fork" else "fork"]


def test_a_fork_that_cannot_reach_the_gpus_is_found_by_a_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver that sees GPUs asks a throwaway child to use one; this CPU build cannot, so the probe says no."""
    runner.forks_reach_cuda.cache_clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    try:
        assert runner.forks_reach_cuda() is torch.cuda.is_available()
    finally:
        runner.forks_reach_cuda.cache_clear()


def test_a_fork_server_that_cannot_start_the_stage_leaves_it_to_a_fresh_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that died (say, importing a stage module crashed it) fails ``start``: the stage still runs, in a
    fresh interpreter, and ends with its own error (the missing run folder's manifest, named)."""
    class DeadChild:
        def __init__(self, **kwargs: object) -> None:
            pass

        def start(self) -> None:
            raise ConnectionRefusedError("no fork server to connect to")

    monkeypatch.setattr(runner, "fork_server", lambda: SimpleNamespace(Process=DeadChild))
    monkeypatch.setattr(runner, "forks_reach_cuda", lambda: True)
    missing = tmp_path / "missing"
    outcome = runner.run_stage(["test", "--run_dir", str(missing), "--model", "sasrec"], verbose=False)
    assert outcome.returncode == 2
    assert outcome.last_error_line.startswith("mmrec test: error: ") and f"{missing}/prepare/manifest.json" in outcome.last_error_line
