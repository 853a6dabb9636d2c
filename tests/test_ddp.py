"""Training stages under Lightning DDP (2 CPU processes, gloo).

* the resumable sampler's sharding: disjoint, complete, equal batch counts per rank, deterministic, resumable;
* fit-collab, fit-quantizer and fit-recommender (both heads), chained in one run directory under
  ``--trainer.devices 2 --trainer.strategy ddp``, publish the same files (names, Parquet schemas, row counts,
  manifests) as single-process runs, end with identical weights on both ranks, and ``mmrec test`` evaluates
  what they publish;
* fit-collab killed mid-epoch under DDP and resumed ends exactly where the uninterrupted DDP run ended;
* ``mmrec test --devices 2`` (two CPU processes, each a shard of the users) writes what one process writes;
* a strategy the stages cannot run is one error line and exit code 2.

DDP runs are subprocesses: Lightning's launcher starts the other rank by re-running the command line, which
under pytest would be pytest itself.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from safetensors.torch import load_file
from torch import nn

from mmrec.artifacts import Manifest
from mmrec.cli import main as mmrec
from mmrec.data.resumable import EpochSampler
from mmrec.stages.fsdp import FSDPStrategy
from tests.fixtures import make_prepared_run, write_modality
from tests.llm_helpers import write_sids
from tests.test_resume_kill import Case, assert_mid_epoch, assert_same_result, evaluate, kill_mid_epoch

ROOT = Path(__file__).parent.parent
CONF = Path(__file__).parent / "conf"
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
TIMEOUT_S = 180

# fit-collab on 2 ranks: 60 sequences in batches of 8 are 3 full batches each plus 6 of the 12 left over,
# 4 steps an epoch, 3 epochs; last.ckpt every 3 steps, killed at step 7, so it resumes from step 6: epoch 1
# after 2 of its 4 batches.
COLLAB = Case(
    "fit-collab",
    ["--config", str(CONF / "fit-collab.yaml"), "--trainer.max_steps", "-1", "--trainer.max_epochs", "3",
     "--data.batch_size", "8", "--checkpoint_every_n_steps", "3", *DDP],
    checkpoint_step=6, pause_step=7,
    weights=["sasrec.safetensors", "emb_collab.parquet"], extra=["best_val", "epochs", "global_steps", "stopped_early"],
    test_model="sasrec",
)
LLM_HEADS = {  # head -> (its config, the folder its stage publishes)
    "fusion": ("fit-recommender.yaml", "fit-recommender"),
    "generative": ("fit-recommender-generative.yaml", "fit-recommender-generative"),
}
FINETUNE = {  # LoRA under FSDP: a frozen backbone beside trained adapters in one shard (use_orig_params)
    "full": ["--model.backbone.finetune", "full"],
    "lora": ["--model.backbone.finetune", "lora"],
}
FSDP = ["--config", str(ROOT / "configs" / "strategies" / "fit-recommender-fsdp.yaml")]
# validation every 2 of the 4 steps: a best checkpoint exists, so validate-after-fit loads it through FSDP
VALIDATE = ["--trainer.val_check_interval", "2"]
STAGES = {  # the chain after fit-collab: stage folder -> (command, config)
    "fit-quantizer": ("fit-quantizer", "fit-quantizer.yaml"),
    "fit-recommender": ("fit-recommender", "fit-recommender.yaml"),
    "fit-recommender-generative": ("fit-recommender", "fit-recommender-generative.yaml"),
}


# ----------------------------------------------------------------------------------------------- sharding
def shards(size: int, batch_size: int, replicas: int, epoch: int = 0, lengths=None) -> list[list[int]]:
    out = []
    for rank in range(replicas):
        sampler = EpochSampler(size, 7, batch_size, lengths, chunk_batches=2, num_replicas=replicas, rank=rank)
        sampler.set_epoch(epoch)
        assert len(sampler) == len(list(sampler))
        out.append(list(sampler))
    return out


@pytest.mark.parametrize(("size", "batch_size", "replicas"), [(60, 8, 2), (61, 8, 3), (64, 8, 4), (5, 4, 4), (2, 8, 4)])
@pytest.mark.parametrize("grouped", [False, True])
def test_shards_are_disjoint_complete_and_equal(size: int, batch_size: int, replicas: int, grouped: bool) -> None:
    lengths = np.random.default_rng(0).integers(1, 20, size) if grouped else None
    parts = shards(size, batch_size, replicas, lengths=lengths)
    assert len({len(part) for part in parts}) == 1  # equal sample counts, hence equal batch counts
    everything = [index for part in parts for index in part]
    assert sorted(set(everything)) == list(range(size))  # every sample, once ...
    assert len(everything) - size < replicas  # ... apart from fewer than `replicas` repeats
    whole = EpochSampler(size, 7, batch_size, lengths, chunk_batches=2, num_replicas=replicas, rank=0)
    if lengths is not None:  # every dealt batch is a whole batch of the epoch's order (length groups intact)
        batches = {tuple(whole.order(0)[i:i + batch_size]) for i in range(0, size, batch_size)}
        for part in parts:
            cut = [tuple(part[i:i + batch_size]) for i in range(0, len(part), batch_size)]
            assert all(batch in batches for batch in cut[:-1])


@pytest.mark.parametrize("replicas", [2, 3])
def test_the_ranks_of_one_step_get_batches_of_adjacent_lengths(replicas: int) -> None:
    """A DDP step waits for its slowest rank: the batches the ranks train on together are neighbours in one
    sorted chunk (no length of one lies inside another's range), not a random pair."""
    size, batch_size = 600, 8
    lengths = np.random.default_rng(1).integers(1, 50, size)
    parts = shards(size, batch_size, replicas, lengths=lengths)
    rounds = size // batch_size // replicas
    for step in range(rounds):
        batches = [lengths[part[step * batch_size:(step + 1) * batch_size]] for part in parts]
        ranges = sorted((batch.min(), batch.max()) for batch in batches)
        assert all(high <= low for (_, high), (low, _) in itertools.pairwise(ranges))


def test_shards_are_deterministic_and_change_with_the_epoch() -> None:
    assert shards(60, 8, 2, epoch=3) == shards(60, 8, 2, epoch=3)
    assert shards(60, 8, 2, epoch=3) != shards(60, 8, 2, epoch=4)


def test_one_replica_is_the_whole_order() -> None:
    sampler = EpochSampler(61, 7, 8, num_replicas=1, rank=0)
    assert list(sampler) == sampler.order(0).tolist() and len(sampler) == 61


def test_resume_skips_within_this_ranks_share() -> None:
    sampler = EpochSampler(61, 7, 8, num_replicas=3, rank=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip_next(2 * 8)
    assert list(sampler) == full[16:]
    assert list(sampler) == full  # the skip applies once


# -------------------------------------------------------------------------------------------- bad strategy
@pytest.mark.parametrize("strategy", ["deepspeed", "no_such_strategy", "ddp_spawn"])
def test_a_strategy_the_stages_cannot_run_is_one_line(strategy: str, tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["fit-collab", "--config", str(CONF / "fit-collab.yaml"), "--run_dir", str(tiny_run),
            "--trainer.devices", "2", "--trainer.strategy", strategy]
    assert mmrec(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmrec fit-collab: error: trainer"), lines
    assert "sasrec.safetensors" not in {p.name for p in (tiny_run / "fit-collab").iterdir()}


def test_fsdp_for_the_small_stages_or_off_a_gpu_is_one_line(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    """FSDP serves the LLM heads only, and Lightning runs it on GPUs only: both refusals are one line."""
    write_sids(tiny_run)
    fsdp = str(ROOT / "configs" / "strategies" / "fit-recommender-fsdp.yaml")
    cases = {
        "fit-collab": ["fit-collab", "--config", str(CONF / "fit-collab.yaml"), "--trainer.strategy", "fsdp"],
        "fit-recommender": ["fit-recommender", "--config", str(CONF / "fit-recommender.yaml"), "--config", fsdp],
    }
    for stage, args in cases.items():
        assert mmrec([*args, "--run_dir", str(tiny_run), "--trainer.accelerator", "cpu", "--trainer.devices", "2"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"mmrec {stage}: error: trainer") and "FSDP" in lines[0].upper(), lines
    assert not (tiny_run / "fit-recommender").exists()


def test_fsdp_strategy_validates_through_the_root_wrapper_fit_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """``validate`` after ``fit`` sets the same module up again: it must get fit's root FSDP wrapper back (under
    Lightning's own strategy it gets none, Lightning issue #19015); another module gets a wrapper of its own."""
    made = []

    def wrap(strategy: LightningFSDPStrategy, model: nn.Module) -> SimpleNamespace:
        made.append(SimpleNamespace(module=model))
        return made[-1]

    monkeypatch.setattr(LightningFSDPStrategy, "_setup_model", wrap)
    strategy, fitted, other = FSDPStrategy(), nn.Linear(2, 2), nn.Linear(2, 2)
    assert strategy._setup_model(fitted) is strategy._setup_model(fitted) is made[0]
    assert strategy._setup_model(other) is made[1] and len(made) == 2


# ---------------------------------------------------------------------------------------------- DDP runs
def command(stage: str, run: Path, *args: str, module: str = "mmrec.cli") -> list[str]:
    return [sys.executable, "-m", module, stage, "--run_dir", str(run), *args]


def environment() -> dict[str, str]:
    """One thread a rank; the repository on the path before whatever the caller's path holds."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def start_ddp(stage: str, run: Path, *args: str, module: str = "mmrec.cli") -> subprocess.Popen:
    """Start a stage in its own process group (see :func:`finish`)."""
    return subprocess.Popen(command(stage, run, *args, module=module), cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen) -> None:
    """Wait for a started stage; past TIMEOUT_S the whole group is killed, the ranks Lightning's launcher started
    too (a rank blocked in a collective ignores SIGTERM and would hold its device)."""
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stage = process.args[3]  # command(): python -m MODULE STAGE ...
        pytest.fail(f"{stage} still running after {TIMEOUT_S} s: {stderr[-4000:]}")
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]


def run_ddp(stage: str, run: Path, *args: str, module: str = "mmrec.cli") -> None:
    finish(start_ddp(stage, run, *args, module=module))


@contextlib.contextmanager
def running(processes: list[subprocess.Popen]) -> Iterator[None]:
    """Started stages, each waited for (:func:`finish`) when the block ends; a failure anywhere kills those still
    running, so that no rank runs on into the tests after it."""
    try:
        yield
        for process in processes:
            finish(process)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def agree(path: Path) -> list[str]:
    """A config adding :class:`tests.ddp_helpers.RanksAgree` (writing to ``path``)."""
    config = path.with_suffix(".yaml")
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.ddp_helpers.RanksAgree\n"
        f"      init_args: {{path: {json.dumps(str(path))}}}\n"
    )
    return ["--config", str(config)]


def make_run(path: Path) -> Path:
    run = make_prepared_run(path)
    write_modality(run, "fit-collab", "collab", np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32))
    return run


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same chain run once in this process and once under DDP: ``(single, ddp)`` run directories.

    The stages after fit-collab read its embeddings and the SIDs written here, not each other's folders, so
    their DDP runs go at once: a launch is mostly two interpreters starting one after the other (Lightning's
    launcher starts rank 1 when rank 0 reaches ``fit``), time that overlaps on a second core."""
    base = tmp_path_factory.mktemp("ddp")
    single, ddp = make_run(base / "single"), make_run(base / "ddp")
    run_ddp("fit-collab", ddp, *COLLAB.args, *agree(base / "fit-collab.agree"))
    assert mmrec(["fit-collab", "--run_dir", str(single), *COLLAB.args[:-len(DDP)]]) == 0
    for run in (single, ddp):
        write_sids(run, suffix=True)  # unique SIDs, which the generative head needs
    started = [start_ddp(stage, ddp, "--config", str(CONF / config), *DDP, *agree(base / f"{folder}.agree"))
               for folder, (stage, config) in STAGES.items()]
    with running(started):
        for stage, config in STAGES.values():
            assert mmrec([stage, "--run_dir", str(single), "--config", str(CONF / config)]) == 0
    return single, ddp


def schema_of(path: Path) -> object:
    return pq.read_schema(path) if path.suffix == ".parquet" else None


def assert_publishes_the_same(single: Path, distributed: Path) -> None:
    """A stage folder written by 2 processes holds what a 1-process run's holds: files, Parquet schemas, row
    counts, verified outputs, manifest keys; the manifest records the world size."""
    files = {path.relative_to(single) for path in single.rglob("*") if path.is_file()}
    assert {path.relative_to(distributed) for path in distributed.rglob("*") if path.is_file()} == files
    for name in files:
        assert schema_of(distributed / name) == schema_of(single / name), name
    expected, actual = Manifest.read(single), Manifest.read(distributed)
    assert actual.outputs.keys() == expected.outputs.keys()
    assert {k: v["rows"] for k, v in actual.outputs.items()} == {k: v["rows"] for k, v in expected.outputs.items()}
    for name in actual.outputs:
        actual.verify_output(distributed, name)
    assert actual.extra.keys() == expected.extra.keys()
    if "world_size" in actual.extra:
        assert (actual.extra["world_size"], expected.extra["world_size"]) == (2, 1)


def assert_same_tensor_names(single: Path, distributed: Path) -> None:
    """Every safetensors file of a stage folder names the same tensors, and every one but ``heads.safetensors``
    some (an FSDP export once held an empty adapter, which file names and manifests alone do not show; the
    generative head under LoRA has no heads of its own: its adapter holds the trained token rows)."""
    for path in single.rglob("*.safetensors"):
        names = load_file(str(path)).keys()
        assert load_file(str(distributed / path.relative_to(single))).keys() == names, path
        assert names or path.name == "heads.safetensors", path


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("folder", ["fit-collab", *STAGES])
def test_ddp_publishes_what_a_single_process_run_does(folder: str, pipelines: tuple[Path, Path]) -> None:
    single, ddp = pipelines
    assert_publishes_the_same(single / folder, ddp / folder)
    digests = json.loads((ddp.parent / f"{folder}.agree").read_text())["digests"]
    assert len(digests) == 2 and digests[0] == digests[1], "the ranks ended with different weights"


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize(("folder", "model"), [("fit-collab", "sasrec"), ("fit-recommender", "fusion"),
                                               ("fit-recommender-generative", "generative")])
def test_mmrec_test_evaluates_what_ddp_published(folder: str, model: str, pipelines: tuple[Path, Path]) -> None:
    metrics = evaluate(pipelines[1], model)
    assert 0 <= metrics["ndcg@10"] <= 1 and 0 <= metrics["recall@10"] <= 1


@pytest.mark.usefixtures("single_thread")
def test_fsdp_on_two_cpu_processes_publishes_what_one_process_publishes(pipelines: tuple[Path, Path], tmp_path: Path) -> None:
    """The fusion head (LoRA, tiny backbone) under mmrec's FSDP strategy on 2 CPU processes over gloo, through
    the test-only shim ``tests.fsdp_cpu`` (Lightning runs FSDP on GPUs only): the best checkpoint, validated
    after fit, is loaded through FSDP; the export, written from the gathered state, holds the tensors a
    one-process export holds and ``mmrec test`` evaluates it. Each of the four faults the first GPU runs met
    fails it (the root left unwrapped at validate, the state dict FSDP takes out of a checkpoint, an empty
    adapter, a backbone read through a collective only rank 0 joined, validation shards of unequal batch
    counts)."""
    run = make_run(tmp_path / "fsdp")
    write_sids(run, suffix=True)
    run_ddp("fit-recommender", run, "--config", str(CONF / "fit-recommender.yaml"), *FSDP, *DDP[:-2], *VALIDATE,
            "--data.val_users", "33", "--data.eval_batch_size", "16",  # shards of 17 and 16 users: 2 batches and 1 at 16
            module="tests.fsdp_cpu")
    single = pipelines[0] / "fit-recommender"
    assert_publishes_the_same(single, run / "fit-recommender")
    assert_same_tensor_names(single, run / "fit-recommender")
    assert Manifest.read(run / "fit-recommender").extra["best_checkpoint"]  # validated after fit: loaded through FSDP
    metrics = evaluate(run, "fusion")
    assert 0 <= metrics["ndcg@10"] <= 1


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("finetune", list(FINETUNE))
@pytest.mark.parametrize("head", list(LLM_HEADS))
def test_fsdp_on_two_cpu_processes_for_each_head_and_finetune(head: str, finetune: str, tmp_path: Path) -> None:
    """Both heads, full fine-tuning and LoRA, under FSDP on 2 CPU processes (``tests.fsdp_cpu``) publish what one
    process publishes with the same options, and ``mmrec test`` evaluates the sharded run's export. The default
    suite runs one of the four (above); ``tests/test_gpu.py`` runs all four on GPUs."""
    config, folder = LLM_HEADS[head]
    single, sharded = make_run(tmp_path / "single"), make_run(tmp_path / "fsdp")
    options = ["--config", str(CONF / config), *VALIDATE, *FINETUNE[finetune]]
    for run in (single, sharded):
        write_sids(run, suffix=True)  # unique SIDs, which the generative head needs
    run_ddp("fit-recommender", single, *options, "--trainer.accelerator", "cpu", "--trainer.devices", "1")
    run_ddp("fit-recommender", sharded, *options, *FSDP, *DDP[:-2], module="tests.fsdp_cpu")
    assert_publishes_the_same(single / folder, sharded / folder)
    assert_same_tensor_names(single / folder, sharded / folder)
    assert 0 <= evaluate(sharded, head)["ndcg@10"] <= 1


@pytest.mark.usefixtures("single_thread")
def test_fit_collab_killed_under_ddp_resumes_to_the_same_result(pipelines: tuple[Path, Path], tmp_path: Path) -> None:
    reference, killed = pipelines[1], make_run(tmp_path / "killed")
    kill_mid_epoch(COLLAB, killed, tmp_path, timeout=TIMEOUT_S)
    assert not (killed / COLLAB.stage / "sasrec.safetensors").exists()
    assert_mid_epoch(COLLAB, killed)
    run_ddp(COLLAB.stage, killed, *COLLAB.args, "--resume", "true")
    assert_same_result(COLLAB, reference, killed)


# ------------------------------------------------------------------------------------ mmrec test, 2 processes
TEST_MODELS = ["sasrec", "generative"]  # ranked by scores / by a decoded top-k list


def evaluation_args(model: str) -> list[str]:
    return ["--config", str(CONF / "test.yaml"), "--model", model, "--slices", "true"]


@pytest.fixture(scope="module")
def two_process_tests(pipelines: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``mmrec test --devices 2`` of each model in ``TEST_MODELS``, each on a copy of the single-process chain, all at
    once (as the chain's DDP launches): model -> its run directory."""
    runs = {model: tmp_path_factory.mktemp(f"test-{model}") / "run" for model in TEST_MODELS}
    for run in runs.values():
        shutil.copytree(pipelines[0], run)
    with running([start_ddp("test", run, *evaluation_args(model), "--device", "cpu", "--devices", "2") for model, run in runs.items()]):
        pass
    return runs


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("model", TEST_MODELS)
def test_mmrec_test_on_two_processes_writes_what_one_process_writes(model: str, two_process_tests: dict[str, Path]) -> None:
    """``mmrec test --devices 2``: each process evaluates a shard of the users, rank 0 writes; the metrics,
    slices and predictions equal a single-process evaluation of the same model."""
    run, args = two_process_tests[model], evaluation_args(model)
    two = json.loads((run / "test" / f"{model}-test" / "metrics.json").read_text())
    two_predictions = pq.read_table(run / "test" / f"{model}-test" / "predictions.parquet")
    assert Manifest.read(run / "test" / f"{model}-test").config["devices"] == 2
    assert mmrec(["test", "--run_dir", str(run), *args]) == 0
    one = json.loads((run / "test" / f"{model}-test" / "metrics.json").read_text())
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-9)
    assert two["slices"] == one["slices"]  # from the very ranks, joined
    one_predictions = pq.read_table(run / "test" / f"{model}-test" / "predictions.parquet")
    for column in ("user_idx", "target", "items"):
        assert two_predictions.column(column).equals(one_predictions.column(column)), column
    scores = [np.concatenate(table.column("scores").to_pylist()) for table in (two_predictions, one_predictions)]
    assert np.allclose(*scores, atol=1e-4)  # batches of other users around a user: float rounding only


@pytest.mark.parametrize(("devices", "message"), [("0", "expected at least 1"), ("4096", "this machine has")])
def test_bad_test_devices_are_one_line(devices: str, message: str, tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert mmrec(["test", "--run_dir", str(tiny_run), "--model", "popularity", "--device", "cpu", "--devices", devices]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "devices" in lines[0] and message in lines[0], lines
    assert not (tiny_run / "test" / "popularity-test").exists()
