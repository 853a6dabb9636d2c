"""The resumable training order (``mmrec.data.resumable``), grouping by length, the saved random streams and
atomic checkpoint files (``mmrec.stages.resume``)."""

from __future__ import annotations

import io
import random
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import Dataset

from mmrec.cli import main as mmrec
from mmrec.data.datamodules import SequenceDataModule
from mmrec.data.resumable import EpochSampler, ResumableDataLoader
from mmrec.models.sasrec import SASRec
from mmrec.stages.fit_collab import FitCollabCLI
from mmrec.stages.resume import PARTIAL_SUFFIX, AtomicCheckpointIO, BackgroundCheckpointIO, rng_state, set_rng_state

LENGTHS = np.random.default_rng(0).integers(1, 21, size=203)  # prefix samples: 1 to 20 items


class _Indices(Dataset):
    def __len__(self) -> int:
        return len(LENGTHS)

    def __getitem__(self, index: int) -> int:
        return index


def batches(sampler: EpochSampler, batch_size: int) -> list[list[int]]:
    order = sampler.order(sampler.epoch).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded(groups: list[list[int]]) -> int:
    """Tokens a batch padded to its longest row computes, summed over batches."""
    return sum(len(group) * int(LENGTHS[group].max()) for group in groups)


def loader(seed: int = 3, batch_size: int = 8, grouped: bool = True, **kwargs: object) -> ResumableDataLoader:
    sampler = EpochSampler(len(LENGTHS), seed, batch_size, LENGTHS if grouped else None)
    return ResumableDataLoader(_Indices(), sampler, batch_size, collate_fn=list, **kwargs)


@pytest.mark.parametrize("grouped", [False, True])
def test_an_epoch_is_a_permutation_fixed_by_seed_and_epoch(grouped: bool) -> None:
    sampler = EpochSampler(len(LENGTHS), seed=7, batch_size=8, lengths=LENGTHS if grouped else None)
    first, again = sampler.order(0), EpochSampler(len(LENGTHS), 7, 8, LENGTHS if grouped else None).order(0)
    assert sorted(first.tolist()) == list(range(len(LENGTHS)))  # every sample exactly once
    assert np.array_equal(first, again)  # deterministic under the seed
    assert not np.array_equal(first, sampler.order(1))  # epochs differ
    assert not np.array_equal(first, EpochSampler(len(LENGTHS), 8, 8, LENGTHS if grouped else None).order(0))


def test_grouped_batches_are_length_homogeneous() -> None:
    # one mega-chunk: the batches partition the length-sorted epoch, so their length ranges do not overlap
    whole = EpochSampler(len(LENGTHS), seed=1, batch_size=8, lengths=LENGTHS, chunk_batches=1000)
    groups = batches(whole, 8)
    ranges = sorted((int(LENGTHS[g].min()), int(LENGTHS[g].max())) for g in groups)
    assert all(high <= next_low for (_, high), (next_low, _) in pairwise(ranges))
    assert [len(g) for g in groups[:-1]] == [8] * (len(groups) - 1) and len(groups[-1]) == len(LENGTHS) % 8
    # the default chunks of 50 batches: most of the padding a plain shuffle computes is gone
    default = batches(EpochSampler(len(LENGTHS), seed=1, batch_size=8, lengths=LENGTHS), 8)
    shuffled = batches(EpochSampler(len(LENGTHS), seed=1, batch_size=8), 8)
    assert padded(default) - LENGTHS.sum() < 0.25 * (padded(shuffled) - LENGTHS.sum())


def test_grouped_batch_order_is_shuffled() -> None:
    groups = batches(EpochSampler(len(LENGTHS), seed=1, batch_size=8, lengths=LENGTHS, chunk_batches=1000), 8)
    longest = [int(LENGTHS[g].max()) for g in groups[:-1]]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


@pytest.mark.parametrize("grouped", [False, True])
def test_loader_resumes_mid_epoch_with_the_batches_not_yet_seen(grouped: bool) -> None:
    reference = loader(grouped=grouped)
    reference.sampler.set_epoch(2)
    epoch = list(reference)
    interrupted = loader(grouped=grouped)
    interrupted.sampler.set_epoch(2)
    iterator = iter(interrupted)
    seen = [next(iterator) for _ in range(5)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 5} and seen == epoch[:5]

    resumed = loader(grouped=grouped)  # a new process: built afresh, then given the checkpoint's state
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    iterator = iter(resumed)
    again = [next(iterator) for _ in range(3)]
    assert again == epoch[5:8] and resumed.state_dict() == {"epoch": 2, "batches": 8}

    twice = loader(grouped=grouped)  # killed again in the same epoch: the count kept growing
    twice.load_state_dict(resumed.state_dict())
    twice.sampler.set_epoch(2)
    assert list(twice) == epoch[8:]
    twice.sampler.set_epoch(3)
    assert sorted(i for batch in twice for i in batch) == list(range(len(LENGTHS)))  # the position is used once


def test_a_position_saved_at_an_epoch_end_starts_the_next_epoch_whole() -> None:
    finished = loader()
    list(finished)
    fresh = loader()
    fresh.load_state_dict(finished.state_dict())
    fresh.sampler.set_epoch(1)
    assert len(list(fresh)) == len(finished)


def test_position_counts_batches_consumed_not_prefetched_by_workers() -> None:
    reference = loader()
    epoch = list(reference)
    parallel = loader(num_workers=2)
    iterator = iter(parallel)
    assert [next(iterator) for _ in range(4)] == epoch[:4]
    assert parallel.state_dict() == {"epoch": 0, "batches": 4}
    resumed = loader(num_workers=2)
    resumed.load_state_dict(parallel.state_dict())
    assert list(resumed) == epoch[4:]


def test_creating_an_iterator_draws_nothing_from_the_global_rng() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    iter(loader()).__next__()
    assert torch.equal(torch.rand(3), expected)


def test_sequence_data_module_groups_prefix_samples_by_length(tiny_run: Path) -> None:
    def padding(group_by_length: bool) -> float:
        data = SequenceDataModule(run_dir=str(tiny_run), max_len=8, batch_size=8, train_mode="prefix",
                                  group_by_length=group_by_length, seed=0)
        masks = [batch["mask"] for batch in data.train_dataloader()]
        assert sum(len(mask) for mask in masks) == len(data.train_dataset())
        return sum(float((~mask).sum()) for mask in masks) / sum(mask.numel() for mask in masks)

    assert padding(True) < 0.5 * padding(False)


def test_seed_defaults_to_the_global_seed(tiny_run: Path) -> None:
    torch.manual_seed(11)
    assert SequenceDataModule(run_dir=str(tiny_run)).seed == 11
    assert SequenceDataModule(run_dir=str(tiny_run), seed=5).seed == 5


def test_rng_state_survives_a_weights_only_checkpoint() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    buffer = io.BytesIO()
    torch.save({"rng": rng_state()}, buffer)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True)["rng"])
    drawn = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]


def test_negative_checkpoint_interval_is_one_error_line(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = mmrec(["fit-collab", "--config", "tests/conf/fit-collab.yaml", "--run_dir", str(tiny_run),
                  "--checkpoint_every_n_steps", "-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "checkpoint_every_n_steps" in err


def test_a_checkpoint_write_that_dies_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"step": torch.tensor(1)}, target)

    def dies_half_way(obj: object, handle: io.BufferedWriter) -> None:
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # what a kill would leave mid-write: a partial file, never renamed

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io_.save_checkpoint({"step": torch.tensor(2)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


class SlowCheckpointIO(AtomicCheckpointIO):
    """Writes that take a while: what a background write of a large checkpoint looks like to its caller."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        time.sleep(0.3)
        super().save_checkpoint(checkpoint, path, storage_options)


def test_background_checkpoints_keep_the_order_of_writes_removals_and_reads(tmp_path: Path) -> None:
    io_ = BackgroundCheckpointIO(SlowCheckpointIO())
    replaced, last = tmp_path / "best-epoch=0.ckpt", tmp_path / "last.ckpt"
    step = torch.tensor(1)
    io_.save_checkpoint({"step": step}, replaced)
    step += 1  # training goes on: the write holds the tensor as it was when saved
    io_.remove_checkpoint(replaced)  # a better checkpoint replaced it before its write finished
    io_.save_checkpoint({"step": step}, last)
    assert io_.load_checkpoint(last)["step"] == 2  # a read waits for the writes before it
    io_.save_checkpoint({"step": torch.tensor(3)}, last)
    io_.teardown()
    assert not replaced.exists() and torch.load(last, weights_only=True)["step"] == 3


def test_stages_write_checkpoints_atomically_and_clear_partial_files(tiny_run: Path) -> None:
    cli = FitCollabCLI("fit-collab", SASRec, SequenceDataModule,
                       ["--config", "tests/conf/fit-collab.yaml", "--run_dir", str(tiny_run), "--resume", "true"])
    checkpoint_io = cli.trainer.strategy.checkpoint_io
    assert isinstance(checkpoint_io, BackgroundCheckpointIO) and isinstance(checkpoint_io.checkpoint_io, AtomicCheckpointIO)
    cli.checkpoint_dir.mkdir(parents=True)
    left_by_a_kill = cli.checkpoint_dir / f".last.ckpt.123{PARTIAL_SUFFIX}"
    left_by_a_kill.write_bytes(b"half")
    assert cli.start_from() is None and not left_by_a_kill.exists()


def test_ranks_meet_after_fit_before_anyone_reads_a_checkpoint(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 writes checkpoints in the background and waits for them as fit ends; the other ranks must wait
    for rank 0 at a barrier before fit-collab reads the best checkpoint (a 2-rank run with slow writes read a
    checkpoint that was not there yet)."""
    names: list[str | None] = []
    monkeypatch.setattr(SingleDeviceStrategy, "barrier", lambda self, name=None: names.append(name))
    assert mmrec(["fit-collab", "--config", "tests/conf/fit-collab.yaml", "--run_dir", str(tiny_run)]) == 0
    assert "checkpoints written" in names


def test_every_checkpoint_is_written_when_the_ranks_meet(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FSDP nothing waits for the background writes as fit ends (Lightning's FSDP teardown skips the
    checkpoint plugin's) and the strategy reads the best checkpoint itself: the stage waits before the barrier."""
    write = AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", lambda *args: (time.sleep(0.3), write(*args)))
    monkeypatch.setattr(BackgroundCheckpointIO, "teardown", lambda self: None)  # as under FSDP
    checkpoints = tiny_run / "fit-collab.work" / "checkpoints"
    at_barrier: list[set[str]] = []

    def barrier(self: SingleDeviceStrategy, name: str | None = None) -> None:
        if name == "checkpoints written":
            at_barrier.append({path.name for path in checkpoints.glob("*.ckpt")})

    monkeypatch.setattr(SingleDeviceStrategy, "barrier", barrier)
    assert mmrec(["fit-collab", "--config", "tests/conf/fit-collab.yaml", "--run_dir", str(tiny_run)]) == 0
    assert len(at_barrier) == 1 and at_barrier[0] == {p.name for p in checkpoints.glob("*.ckpt")} != set()


def test_a_linked_last_checkpoint_is_refused(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = mmrec(["fit-collab", "--config", "tests/conf/fit-collab.yaml", "--run_dir", str(tiny_run),
                  "--model_checkpoint.save_last", "link"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "model_checkpoint.save_last: link" in err
    assert not any(path.is_file() for path in (tiny_run / "fit-collab.work").rglob("*"))  # refused before any write
