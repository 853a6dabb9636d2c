"""Every training stage, killed with SIGKILL mid-epoch and resumed with ``--resume true``, ends exactly where an
uninterrupted run ends: byte-identical exported weights, identical best validation metrics and identical
``mmrec test`` metrics (CPU, one thread, fixed seed).

Each test trains a reference run in-process, then the same command in a subprocess that stops at a fixed
step (``tests/resume_helpers.PauseAtStep``) and is killed there by the test with SIGKILL, then the same
command again with ``--resume true``. The kill lands after the stage's last ``last.ckpt`` (written every
``--checkpoint_every_n_steps`` steps) and before the next, in the middle of an epoch, so the resumed run
has to redo lost steps from the middle of an epoch's order with the random streams of that moment.

What makes the comparison able to fail: resuming the same checkpoint without the loader's position, without
the random streams or (quantizer) without the dead-code statistics ends elsewhere
(``test_resume_without_saved_state_differs``), and each test asserts that the checkpoint it resumed from was
taken mid-epoch, so that a checkpoint at an epoch's end (which needs no loader position) cannot pass for one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.cli import main as mmrec
from mmrec.models.mm_rqvae import DEAD_CODE_STATS
from tests.fixtures import make_prepared_run, write_modality
from tests.llm_helpers import write_sids

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).parent.parent
CONF = Path(__file__).parent / "conf"
KILL_TIMEOUT_S = 120


@dataclass
class Case:
    """One stage's kill test: its tiny command, where it checkpoints and stops, and what must match."""

    stage: str
    args: list[str]
    checkpoint_step: int  # the last multiple of --checkpoint_every_n_steps before pause_step
    pause_step: int
    weights: list[str]  # files of the stage folder that must be byte-identical
    extra: list[str]  # manifest `extra` keys that must be equal
    test_model: str | None = None  # `mmrec test --model` to compare, if the stage feeds one
    prepare: Callable[[Path], object] = field(default=lambda run: None)


def _collab(run: Path) -> None:
    write_modality(run, "fit-collab", "collab", np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32))


def _collab_and_sids(run: Path) -> None:
    _collab(run)
    write_sids(run)


# fit-collab: 60 training sequences in batches of 8 (8 batches an epoch), 3 epochs; last.ckpt every 3 steps,
# killed at step 13, so it resumes from step 12: epoch 1, after 4 of its 8 batches.
COLLAB = Case(
    "fit-collab",
    ["--config", str(CONF / "fit-collab.yaml"), "--trainer.max_steps", "-1", "--trainer.max_epochs", "3",
     "--data.batch_size", "8", "--checkpoint_every_n_steps", "3"],
    checkpoint_step=12, pause_step=13,
    weights=["sasrec.safetensors", "emb_collab.parquet"], extra=["best_val", "epochs", "global_steps", "stopped_early"],
    test_model="sasrec", prepare=_collab,
)
# fit-quantizer: 40 items in batches of 8 (5 an epoch), 3 epochs; last.ckpt every 3 steps, killed at step 8,
# resumed from step 6: epoch 1 after 1 of 5 batches. Dead-code re-seeding at the start of epoch 2 reads the
# usage counts of all of epoch 1, the batch before the kill included.
QUANTIZER = Case(
    "fit-quantizer",
    ["--config", str(CONF / "fit-quantizer.yaml"), "--data.batch_size", "8", "--checkpoint_every_n_steps", "3"],
    checkpoint_step=6, pause_step=8,
    weights=["quantizer.safetensors", "codebooks.safetensors"], extra=["metrics", "epochs", "steps"],
    prepare=_collab,
)
# fit-recommender on the tiny backbone, batches grouped by length: epochs cut to 6 batches, 2 epochs; last.ckpt
# every 4 steps, killed at step 10, resumed from step 8: epoch 1 after 2 of its 6 batches.
RECOMMENDER = Case(
    "fit-recommender",
    ["--config", str(CONF / "fit-recommender.yaml"), "--trainer.max_steps", "-1", "--trainer.max_epochs", "2",
     "--trainer.limit_train_batches", "6", "--data.group_by_length", "true", "--checkpoint_every_n_steps", "4"],
    checkpoint_step=8, pause_step=10,
    weights=["heads.safetensors", "adapter/adapter_model.safetensors"], extra=["best_val", "epochs", "global_steps"],
    test_model="fusion", prepare=_collab_and_sids,
)


def make_run(path: Path, case: Case) -> Path:
    run = make_prepared_run(path)
    case.prepare(run)
    return run


def train(case: Case, run: Path, *extra: str) -> None:
    assert mmrec([case.stage, "--run_dir", str(run), *case.args, *extra]) == 0


def kill_mid_epoch(case: Case, run: Path, tmp_path: Path, timeout: float = KILL_TIMEOUT_S) -> None:
    """Run the stage in a subprocess until it pauses at ``case.pause_step``, then SIGKILL it with every
    process it started (its own process group: under DDP, Lightning starts the other ranks)."""
    marker = tmp_path / "paused"
    pause = tmp_path / "pause.yaml"
    pause.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.resume_helpers.PauseAtStep\n"
        f"      init_args: {{step: {case.pause_step}, marker: {json.dumps(str(marker))}}}\n"
    )
    command = [sys.executable, "-m", "mmrec.cli", case.stage, "--run_dir", str(run), *case.args, "--config", str(pause)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "killed.log"
    published = run / case.stage / "manifest.json"
    before = published.read_bytes() if published.exists() else None
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not marker.exists():
                assert process.poll() is None, f"the stage ended before step {case.pause_step}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no pause within {timeout} s:\n{log.read_text()[-3000:]}"
                time.sleep(0.05)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert int(marker.read_text()) == case.pause_step
    assert (published.read_bytes() if published.exists() else None) == before, "a killed stage published something"


def assert_mid_epoch(case: Case, run: Path) -> None:
    """last.ckpt is the one written at ``case.checkpoint_step``, part-way through an epoch."""
    checkpoint = torch.load(run / f"{case.stage}.work" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == case.checkpoint_step
    fit_loop = checkpoint["loops"]["fit_loop"]
    [loader] = fit_loop["state_dict"]["combined_loader"]
    batches = fit_loop["epoch_loop.batch_progress"]  # saved in on_train_batch_end: that batch is processed
    assert loader["epoch"] == checkpoint["epoch"] and loader["batches"] == batches["current"]["processed"] > 0
    assert not batches["is_last_batch"]
    assert "RNGState" in checkpoint["callbacks"]


def evaluate(run: Path, model: str) -> dict:
    assert mmrec(["test", "--config", str(CONF / "test.yaml"), "--run_dir", str(run), "--model", model]) == 0
    return json.loads((run / "test" / f"{model}-test" / "metrics.json").read_text())["metrics"]


def assert_same_result(case: Case, reference: Path, resumed: Path) -> None:
    for name in case.weights:
        assert (reference / case.stage / name).read_bytes() == (resumed / case.stage / name).read_bytes(), name
    expected = json.loads((reference / case.stage / "manifest.json").read_text())["extra"]
    actual = json.loads((resumed / case.stage / "manifest.json").read_text())["extra"]
    assert {key: actual[key] for key in case.extra} == {key: expected[key] for key in case.extra}
    assert actual["resumed_from"] == str(resumed / f"{case.stage}.work" / "checkpoints" / "last.ckpt")
    if case.test_model:
        assert evaluate(resumed, case.test_model) == evaluate(reference, case.test_model)


def check_kill_and_resume(case: Case, tmp_path: Path) -> None:
    reference, killed = make_run(tmp_path / "reference", case), make_run(tmp_path / "killed", case)
    train(case, reference)
    kill_mid_epoch(case, killed, tmp_path)
    assert_mid_epoch(case, killed)
    train(case, killed, "--resume", "true")
    assert_same_result(case, reference, killed)


def test_fit_collab_killed_mid_epoch_resumes_to_the_same_result(tmp_path: Path) -> None:
    check_kill_and_resume(COLLAB, tmp_path)


def test_fit_quantizer_killed_mid_epoch_resumes_to_the_same_result(tmp_path: Path) -> None:
    check_kill_and_resume(QUANTIZER, tmp_path)


def test_fit_recommender_killed_mid_epoch_resumes_to_the_same_result(tmp_path: Path) -> None:
    check_kill_and_resume(RECOMMENDER, tmp_path)


def _strip(checkpoint: dict, what: str | None) -> None:
    if what == "loader position":
        del checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    elif what == "random streams":
        del checkpoint["callbacks"]["RNGState"]
    elif what == "dead-code statistics":
        del checkpoint[DEAD_CODE_STATS]


@pytest.mark.parametrize(
    ("case", "strip"),
    [(COLLAB, None), (COLLAB, "loader position"), (COLLAB, "random streams"), (QUANTIZER, "dead-code statistics")],
    ids=["fit-collab-complete", "fit-collab-no-loader-position", "fit-collab-no-random-streams",
         "fit-quantizer-no-dead-code-statistics"],
)
def test_resume_without_saved_state_differs(case: Case, strip: str | None, tmp_path: Path) -> None:
    """The control: the same mid-epoch checkpoint, minus one thing mmrec adds to it, resumes to another model;
    complete, it resumes to the reference. (A run stopped in-process by ``max_steps`` at the checkpoint's step
    stands in for the kill, to keep this fast; nothing in these stages depends on ``max_steps`` before it.)"""
    reference, resumed = make_run(tmp_path / "reference", case), make_run(tmp_path / "resumed", case)
    train(case, reference)
    train(case, resumed, "--trainer.max_steps", str(case.checkpoint_step))
    assert_mid_epoch(case, resumed)
    last = resumed / f"{case.stage}.work" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    _strip(checkpoint, strip)
    torch.save(checkpoint, last)
    shutil.rmtree(resumed / case.stage)
    train(case, resumed, "--resume", "true")
    name = case.weights[0]
    same = (reference / case.stage / name).read_bytes() == (resumed / case.stage / name).read_bytes()
    assert same == (strip is None)
