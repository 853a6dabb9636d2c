"""The two LightningDataModules that every training and prediction stage shares.

Sequences are left-padded: the most recent item is always at position ``-1``, which is where both SASRec
and the LLM read their prediction from, whatever the history's length.

Training loaders are :class:`~mmrec.data.resumable.ResumableDataLoader` over an
:class:`~mmrec.data.resumable.EpochSampler`: the order of every epoch is a function of the data module's
``seed`` and the epoch, and a run killed mid-epoch resumes with exactly the batches it had not trained on.

Under DDP every loader shards itself (the loaders are built after Lightning has set up the process group):
training through the sampler, evaluation through :func:`~mmrec.data.resumable.eval_sampler` (each user on
one rank), except the quantizer's validation, which scores the whole item table on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from mmrec.data.prepared import ModalityEmbeddings, PreparedData, load_modality
from mmrec.data.recommender_inputs import InputNeeds, InputSource, RecommenderInputs, load_recommender_inputs
from mmrec.data.resumable import (
    EpochSampler,
    ResumableDataLoader,
    equal_count_batch_size,
    eval_batch_counts,
    eval_sampler,
    world,
)
from mmrec.errors import InputError


def _training_seed(seed: int | None) -> int:
    """``seed``, or the seed the global torch RNG was last seeded with (the run's ``seed_everything``)."""
    if seed is None:
        return torch.initial_seed()
    if seed < 0:
        raise InputError(f"data.seed must be non-negative, got {seed}")
    return seed


def left_pad(histories: Sequence[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each history's last ``max_len`` items, left-pad with 0; return ``(items [B, L], mask [B, L])``."""
    length = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    items = torch.zeros(len(histories), length, dtype=torch.long)
    mask = torch.zeros(len(histories), length, dtype=torch.bool)
    for row, history in enumerate(histories):
        tail = history[-max_len:] if max_len > 0 else history[:0]
        if len(tail):
            items[row, length - len(tail):] = torch.as_tensor(tail, dtype=torch.long)
            mask[row, length - len(tail):] = True
    return items, mask


class _Samples(Dataset):
    """(user, history, target) samples; ``target`` is an int (next item) or an array (shifted targets)."""

    def __init__(self, users: np.ndarray, histories: list[np.ndarray], targets: list) -> None:
        self.users, self.histories, self.targets = users, histories, targets

    def __len__(self) -> int:
        return len(self.histories)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray, object]:
        return int(self.users[index]), self.histories[index], self.targets[index]


class SequenceDataModule(L.LightningDataModule):
    """Users' item sequences from ``<run_dir>/prepare``, leave-one-out.

    Args:
        run_dir: run directory holding ``prepare/``.
        max_len: histories are left-truncated to their last ``max_len`` items.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and prediction.
        train_mode: ``shifted`` gives each user's whole training sequence once with next-item targets at
            every position (SASRec); ``prefix`` gives every prefix of it as one sample with the following
            item as target (what the LLM recommender trains on).
        predict_split: which split ``predict_dataloader`` serves (``valid`` or ``test``).
        num_workers: DataLoader workers.
        group_by_length: form training batches from samples of similar history length (shuffled with the
            seed, cut into mega-chunks of 50 batches, each sorted by length and cut into batches, batches in
            random order). Every batch is padded to its longest row, so with ``prefix`` samples (1 to
            ``max_len`` items) grouping saves most of the padding the LLM would otherwise compute on.
            Batches then differ from a plain shuffle's in which samples meet, not in what an epoch covers.
        seed: seed of the training order (epoch ``e`` is a function of ``(seed, e)``); None takes the seed the
            global torch RNG was last seeded with, i.e. the run's ``seed_everything``.
        val_users: validate on a fixed random sample of this many users (drawn with ``seed``) instead of all
            of them (None). For a head whose validation is costly (the generative head's beam search), the
            checkpoint choice needs a stable estimate, not every user. A count of users rather than
            Lightning's ``trainer.limit_val_batches``: there, ``1`` means one batch but ``1.0`` every batch,
            and a YAML ``1`` reached one install's Trainer as ``1.0`` (bench/RESULTS.md, session 7).
            ``mmrec test --split valid`` always scores every user.
    """

    def __init__(
        self,
        run_dir: str = "runs/demo",
        max_len: int = 50,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        train_mode: Literal["shifted", "prefix"] = "shifted",
        predict_split: Literal["valid", "test"] = "test",
        num_workers: int = 0,
        group_by_length: bool = False,
        seed: int | None = None,
        val_users: int | None = None,
    ) -> None:
        super().__init__()
        if max_len < 1:
            raise InputError(f"data.max_len must be at least 1, got {max_len}")
        if val_users is not None and val_users < 1:
            raise InputError(f"data.val_users must be at least 1 (or null for every user), got {val_users}")
        self.run_dir = run_dir
        self.max_len = max_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_mode = train_mode
        self.predict_split = predict_split
        self.num_workers = num_workers
        self.group_by_length = group_by_length
        self.seed = _training_seed(seed)
        self.val_users = val_users
        self.prepared = PreparedData(run_dir)
        self.input_sources: dict[str, InputSource] = {}

    @property
    def num_items(self) -> int:
        return self.prepared.num_items

    def recommender_inputs(self, needs: InputNeeds) -> RecommenderInputs:
        """The catalog tensors an LLM recommender needs, read from the run folder; the files they came from
        are kept in ``input_sources`` for the stage's manifest."""
        inputs, self.input_sources = load_recommender_inputs(self.prepared, needs)
        return inputs

    @property
    def item_counts(self) -> np.ndarray:
        return self.prepared.train_item_counts

    def train_dataset(self) -> _Samples:
        histories, _ = self.prepared.histories("train")
        users, inputs, targets = [], [], []
        for user, seq in enumerate(histories):
            if len(seq) < 2:
                continue
            if self.train_mode == "shifted":
                users.append(user)
                inputs.append(seq[:-1])
                targets.append(seq[1:])
            else:
                for t in range(1, len(seq)):
                    users.append(user)
                    inputs.append(seq[max(0, t - self.max_len):t])
                    targets.append(int(seq[t]))
        if not inputs:
            raise InputError(f"{self.prepared.interactions_path}: no user has two or more training interactions")
        return _Samples(np.asarray(users), inputs, targets)

    def eval_dataset(self, split: str) -> Dataset:
        histories, targets = self.prepared.histories(split)
        return _Samples(np.arange(len(histories)), histories, list(targets))

    def collate(self, samples: list[tuple[int, np.ndarray, object]]) -> dict[str, torch.Tensor]:
        users, histories, targets = zip(*samples)
        items, mask = left_pad(histories, self.max_len)
        batch = {"user_idx": torch.as_tensor(users, dtype=torch.long), "history": items, "mask": mask}
        if isinstance(targets[0], np.ndarray):
            shifted, _ = left_pad(targets, self.max_len)
            shifted[~mask] = -100
            batch["targets"] = shifted
        else:
            batch["target"] = torch.as_tensor(targets, dtype=torch.long)
        return batch

    def _loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        replicas, rank = world()
        if replicas > 1 and isinstance(getattr(self.trainer, "strategy", None), FSDPStrategy):
            # under FSDP every forward is a collective: a rank with a batch more would wait for the others forever
            sizes = [equal_count_batch_size(len(dataset), batch_size, replicas, r) for r in range(replicas)]
            if None in sizes:
                counts = eval_batch_counts(len(dataset), batch_size, replicas)
                raise InputError(
                    f"data: {len(dataset)} evaluation users in batches of {batch_size} give the {replicas} FSDP ranks "
                    f"{min(counts)} to {max(counts)} batches, and under FSDP every rank must run as many; change "
                    "data.val_users or data.eval_batch_size"
                )
            batch_size = sizes[rank]
        return DataLoader(
            dataset, batch_size=batch_size, sampler=eval_sampler(len(dataset)), collate_fn=self.collate,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = self.train_dataset()
        lengths = [min(len(h), self.max_len) for h in dataset.histories] if self.group_by_length else None
        sampler = EpochSampler(len(dataset), self.seed, self.batch_size, lengths)
        return ResumableDataLoader(
            dataset, sampler, self.batch_size, collate_fn=self.collate,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        dataset = self.eval_dataset("valid")
        if self.val_users is not None and self.val_users < len(dataset):
            rows = np.random.default_rng(self.seed).choice(len(dataset), self.val_users, replace=False)
            dataset = Subset(dataset, np.sort(rows).tolist())
        return self._loader(dataset, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset("test"), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset(self.predict_split), self.eval_batch_size)


class _ItemFeatures(Dataset):
    def __init__(self, tables: dict[str, ModalityEmbeddings]) -> None:
        self.tensors = {name: torch.from_numpy(t.matrix) for name, t in tables.items()}
        self.present = {name: torch.from_numpy(t.present) for name, t in tables.items()}
        self.num_items = len(next(iter(self.tensors.values())))

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {"item_idx": torch.tensor(index, dtype=torch.long)}
        for name, matrix in self.tensors.items():
            sample[name] = matrix[index]
            sample[f"{name}_present"] = self.present[name][index]
        return sample

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch with one gather per tensor (the DataLoader's batched fetch), not one call per item."""
        index = torch.as_tensor(indices, dtype=torch.long)
        batch = {"item_idx": index}
        for name, matrix in self.tensors.items():
            batch[name] = matrix[index]
            batch[f"{name}_present"] = self.present[name][index]
        return batch


def _already_batched(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


class ItemFeatureDataModule(L.LightningDataModule):
    """Per-item embeddings of the chosen modalities with their masks, one row per item.

    Batches are dicts: ``item_idx [B]``, and for each modality ``m``: ``m [B, d_m]`` and ``m_present [B]``.
    Training shuffles (resumably, see :class:`~mmrec.data.resumable.ResumableDataLoader`); validation and
    prediction walk every item in ``item_idx`` order.

    Args:
        run_dir: run directory; ``text``/``image`` come from ``prepare/``, ``collab`` from ``fit-collab/``.
        modalities: any non-empty subset of ``collab``, ``text``, ``image``.
        batch_size: training batch size.
        eval_batch_size: batch size for validation and prediction.
        num_workers: DataLoader workers.
        seed: seed of the training order; None takes the run's ``seed_everything`` (see ``SequenceDataModule``).
    """

    def __init__(
        self,
        run_dir: str = "runs/demo",
        modalities: list[str] = ["collab", "text"],  # noqa: B006 (jsonargparse needs a literal default)
        batch_size: int = 1024,
        eval_batch_size: int = 4096,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not modalities:
            raise InputError("data.modalities must name at least one of collab, text, image")
        if len(set(modalities)) != len(modalities):
            raise InputError(f"data.modalities lists a modality twice: {modalities}")
        self.run_dir = run_dir
        self.modalities = list(modalities)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = _training_seed(seed)
        self.prepared = PreparedData(run_dir)
        self.tables = {m: load_modality(run_dir, m, self.prepared) for m in self.modalities}
        self.dataset = _ItemFeatures(self.tables)

    @property
    def num_items(self) -> int:
        return self.prepared.num_items

    @property
    def input_dims(self) -> dict[str, int]:
        return {name: table.dim for name, table in self.tables.items()}

    def _loader(self, batch_size: int) -> DataLoader:
        """Every item in ``item_idx`` order, on every rank.

        The quantizer's validation scores codes over the whole table (utilisation, unique tuples, Kendall's
        tau are not sums over items that ranks could add up), so under DDP each rank scores all items and
        logs the same figures. The sampler is then a one-replica ``DistributedSampler`` (all items, in
        order) only so that Lightning does not shard the loader itself.
        """
        replicas, _ = world()
        sampler = None
        if replicas > 1:
            sampler = DistributedSampler(range(len(self.dataset)), num_replicas=1, rank=0, shuffle=False)
        return DataLoader(
            self.dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=_already_batched,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        # the batch size only decides how the order is shared out under DDP (a plain shuffle ignores it)
        sampler = EpochSampler(len(self.dataset), self.seed, self.batch_size)
        return ResumableDataLoader(
            self.dataset, sampler, self.batch_size, num_workers=self.num_workers, collate_fn=_already_batched,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.eval_batch_size)
