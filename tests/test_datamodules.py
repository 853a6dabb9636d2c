"""SequenceDataModule and ItemFeatureDataModule: padding, truncation, split targets, masks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmrec.data import datamodules
from mmrec.data.datamodules import ItemFeatureDataModule, SequenceDataModule, left_pad
from mmrec.data.resumable import equal_count_batch_size, eval_batch_counts
from mmrec.errors import InputError
from mmrec.stages.fsdp import FSDPStrategy


def test_left_pad_keeps_most_recent_items() -> None:
    items, mask = left_pad([np.array([1, 2, 3, 4]), np.array([7])], max_len=3)
    assert items.tolist() == [[2, 3, 4], [0, 0, 7]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_eval_batches_hold_history_and_target(tiny_run: Path) -> None:
    dm = SequenceDataModule(run_dir=str(tiny_run), max_len=4, eval_batch_size=8)
    batch = next(iter(dm.test_dataloader()))
    seq0 = dm.prepared.sequences[0]
    assert batch["target"][0].item() == seq0[-1]
    assert batch["history"][0][batch["mask"][0]].tolist() == seq0[:-1][-4:].tolist()


def validation_users(dm: SequenceDataModule) -> list[int]:
    return [user for batch in dm.val_dataloader() for user in batch["user_idx"].tolist()]


def test_val_users_validates_a_fixed_sample_of_that_many_users(tiny_run: Path) -> None:
    everyone = validation_users(SequenceDataModule(run_dir=str(tiny_run), eval_batch_size=8, seed=3))
    sample = validation_users(SequenceDataModule(run_dir=str(tiny_run), eval_batch_size=8, seed=3, val_users=10))
    again = validation_users(SequenceDataModule(run_dir=str(tiny_run), eval_batch_size=8, seed=3, val_users=10))
    other = validation_users(SequenceDataModule(run_dir=str(tiny_run), eval_batch_size=8, seed=4, val_users=10))
    assert len(everyone) == 60 and len(sample) == 10 and len(set(sample)) == 10 and set(sample) <= set(everyone)
    assert sample == again and sample != other and sample != everyone[:10]  # seeded, not the first users
    assert validation_users(SequenceDataModule(run_dir=str(tiny_run), val_users=500)) == everyone  # more than there are: all


def test_val_users_below_one_is_refused(tiny_run: Path) -> None:
    with pytest.raises(InputError, match="data.val_users"):
        SequenceDataModule(run_dir=str(tiny_run), val_users=0)


def test_shifted_training_targets_are_next_items(tiny_run: Path) -> None:
    dm = SequenceDataModule(run_dir=str(tiny_run), max_len=50, train_mode="shifted")
    dataset = dm.train_dataset()
    batch = dm.collate([dataset[0]])
    train = dm.prepared.sequences[int(batch["user_idx"][0])][:-2]
    mask = batch["mask"][0]
    assert batch["history"][0][mask].tolist() == train[:-1].tolist()
    assert batch["targets"][0][mask].tolist() == train[1:].tolist()
    assert (batch["targets"][0][~mask] == -100).all()


def test_prefix_mode_gives_every_prefix(tiny_run: Path) -> None:
    dm = SequenceDataModule(run_dir=str(tiny_run), max_len=50, train_mode="prefix")
    expected = sum(max(0, len(s) - 3) for s in dm.prepared.sequences)
    assert len(dm.train_dataset()) == expected


def test_item_features_carry_masks(tiny_run: Path) -> None:
    dm = ItemFeatureDataModule(run_dir=str(tiny_run), modalities=["collab", "text"], eval_batch_size=64)
    assert dm.input_dims == {"collab": 8, "text": 16}
    batch = next(iter(dm.predict_dataloader()))
    assert batch["text"].shape == (40, 16) and batch["collab"].shape == (40, 8)
    assert not batch["text_present"][0] and batch["text_present"][1:].all()
    assert torch.equal(batch["item_idx"], torch.arange(40))


def test_item_features_reject_empty_modalities(tiny_run: Path) -> None:
    with pytest.raises(InputError, match="at least one"):
        ItemFeatureDataModule(run_dir=str(tiny_run), modalities=[])


@pytest.mark.parametrize(("size", "batch_size", "replicas", "counts"), [
    (64, 32, 2, [1, 1]), (65, 32, 2, [2, 1]), (66, 32, 2, [2, 2]), (5, 8, 4, [1, 1, 1, 1]), (3, 8, 4, [1, 1, 1, 0]),
])
def test_eval_batch_counts_per_rank(size: int, batch_size: int, replicas: int, counts: list[int]) -> None:
    assert eval_batch_counts(size, batch_size, replicas) == counts
    shards = [len(range(rank, size, replicas)) for rank in range(replicas)]
    assert sum(shards) == size and counts == [-(-n // batch_size) for n in shards]


@pytest.mark.parametrize("replicas", [2, 3, 4, 8])
@pytest.mark.parametrize("batch_size", [1, 2, 7, 32])
def test_equal_count_batch_sizes_give_every_rank_as_many_batches(replicas: int, batch_size: int) -> None:
    for size in range(replicas, 200):
        target = max(eval_batch_counts(size, batch_size, replicas))
        for rank in range(replicas):
            smaller = equal_count_batch_size(size, batch_size, replicas, rank)
            users = len(range(rank, size, replicas))
            if smaller is None:  # no batch size makes the count: every smaller one makes more batches
                assert all(-(-users // b) != target for b in range(1, batch_size + 1))
            else:
                assert 1 <= smaller <= batch_size and -(-users // smaller) == target


def test_unequal_evaluation_batches_under_fsdp(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FSDP each forward is a collective: a rank with one evaluation batch more would hang the run. The
    smaller shard takes smaller batches; where no batch size evens the counts, one error line."""
    dm = SequenceDataModule(run_dir=str(tiny_run), eval_batch_size=4, val_users=9)  # 5 and 4 users: 2 and 1 batches
    dm.trainer = SimpleNamespace(strategy=FSDPStrategy())
    for rank, size in ((0, 4), (1, 3)):
        monkeypatch.setattr(datamodules, "world", lambda rank=rank: (2, rank))
        assert dm.val_dataloader().batch_size == size
    dm.eval_batch_size = 1  # 5 and 4 batches, and no batch size gives 4 users 5 batches
    with pytest.raises(InputError, match="data: 9 evaluation users in batches of 1 give the 2 FSDP ranks 4 to 5 batches"):
        dm.val_dataloader()
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace())  # DDP: evaluation holds no collective, unequal is fine
    assert dm.val_dataloader().batch_size == 1
