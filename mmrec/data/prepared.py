"""Read the canonical tables that ``mmrec prepare`` writes, with their manifest checked.

Every later stage goes through :class:`PreparedData` and :func:`load_modality` rather than opening Parquet
files itself, so schema, hash and lineage checks happen in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mmrec.artifacts import Manifest, RunFolder, read_table
from mmrec.artifacts.run import StageFolder
from mmrec.artifacts.schemas import INTERACTIONS, ITEMS, SPLITS, USERS, embeddings_to_numpy
from mmrec.data.split import MIN_SPLIT_LENGTH
from mmrec.errors import InputError


@dataclass(frozen=True)
class ModalityEmbeddings:
    """One modality's item embeddings: ``matrix [N, d]``, ``present [N]`` (the explicit mask)."""

    name: str
    matrix: np.ndarray
    present: np.ndarray
    path: Path
    manifest: Manifest

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])


class PreparedData:
    """Items, users and leave-one-out sequences of one run directory's ``prepare`` stage."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run = RunFolder(run_dir)
        self.run_dir = self.run.path
        self.folder, self.manifest = self.run.prepare.path, self.run.prepare.manifest
        self.items_path = self.manifest.verify_output(self.folder, "items")
        self.interactions_path = self.manifest.verify_output(self.folder, "interactions")
        self.users_path = self.manifest.verify_output(self.folder, "users")

    @cached_property
    def items(self) -> pa.Table:
        return _require_dense(read_table(self.items_path, ITEMS), "item_idx", self.items_path)

    @cached_property
    def users(self) -> pa.Table:
        return _require_dense(read_table(self.users_path, USERS), "user_idx", self.users_path)

    @cached_property
    def interactions(self) -> pa.Table:
        """Checked beyond its schema: indices within the tables, known splits, and every user long enough for
        leave-one-out, so that sequences and histories can index without further checks."""
        table = read_table(self.interactions_path, INTERACTIONS)
        path = self.interactions_path
        for column, count in (("user_idx", self.num_users), ("item_idx", self.num_items)):
            values = table.column(column).to_numpy()
            if len(values) and (values.min() < 0 or values.max() >= count):
                raise InputError(f"{path}: column '{column}' has values outside 0..{count - 1}")
        unknown = set(table.column("split").unique().to_pylist()) - set(SPLITS)
        if unknown:
            raise InputError(f"{path}: column 'split' has values other than {', '.join(SPLITS)}: {sorted(unknown)}")
        lengths = np.bincount(table.column("user_idx").to_numpy(), minlength=self.num_users)
        if len(lengths) and lengths.min() < MIN_SPLIT_LENGTH:
            user = int(lengths.argmin())
            raise InputError(f"{path}: user_idx {user} has {lengths[user]} interactions; leave-one-out needs {MIN_SPLIT_LENGTH}")
        return table

    @property
    def num_items(self) -> int:
        return self.items.num_rows

    @property
    def num_users(self) -> int:
        return self.users.num_rows

    @cached_property
    def sequences(self) -> list[np.ndarray]:
        """Each user's full chronological item sequence (train + valid + test), indexed by ``user_idx``."""
        table = self.interactions
        users = table.column("user_idx").to_numpy()
        order = np.lexsort((table.column("position").to_numpy(), users))
        items = table.column("item_idx").to_numpy()[order].astype(np.int64)
        counts = np.bincount(users, minlength=self.num_users)
        return np.split(items, np.cumsum(counts)[:-1])

    def histories(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        """Histories and targets for evaluating ``split``.

        ``train``: every user's training items (target -1, unused). ``valid``: history = training items,
        target = second-last item. ``test``: history = training + validation items, target = last item.
        """
        if split == "train":
            return [s[:-2] for s in self.sequences], np.full(self.num_users, -1, dtype=np.int64)
        if split == "valid":
            return [s[:-2] for s in self.sequences], np.array([s[-2] for s in self.sequences], dtype=np.int64)
        if split == "test":
            return [s[:-1] for s in self.sequences], np.array([s[-1] for s in self.sequences], dtype=np.int64)
        raise ValueError(f"unknown split {split!r}; expected train, valid or test")

    @cached_property
    def train_item_counts(self) -> np.ndarray:
        """Interactions per item in the training split (popularity; frequency-aware fusion)."""
        table = self.interactions
        mask = np.asarray(table.column("split").to_pylist()) == "train"
        return np.bincount(table.column("item_idx").to_numpy()[mask], minlength=self.num_items).astype(np.int64)


def _require_dense(table: pa.Table, column: str, path: Path) -> pa.Table:
    """Rows must be numbered 0..N-1 in order: every other table indexes this one by that number."""
    if not np.array_equal(table.column(column).to_numpy(), np.arange(table.num_rows)):
        raise InputError(f"{path}: column '{column}' must be 0..{table.num_rows - 1} in order")
    return table


def load_modality(run_dir: str | Path, modality: str, prepared: PreparedData | None = None) -> ModalityEmbeddings:
    """Load one modality's embeddings from the run directory, checked against the prepared items."""
    prepared = prepared or PreparedData(run_dir)
    folder, path = prepared.run.embeddings(modality)
    matrix, present = embeddings_to_numpy(read_table(path, "embeddings"), path)
    if len(matrix) != prepared.num_items:
        raise InputError(f"{path}: {len(matrix)} rows, but {prepared.items_path} has {prepared.num_items} items")
    return ModalityEmbeddings(modality, matrix, present, path, folder.manifest)


def load_sids(
    run_dir: str | Path, modality: str, folder: str | Path | None = None, prepared: PreparedData | None = None,
) -> tuple[StageFolder, torch.Tensor, list[torch.Tensor]]:
    """One modality's SIDs (``codes [N, L]``, -1 where an item has none) and codebooks, with the
    ``assign-sids`` folder they came from (``folder`` overrides it), refused unless they descend from the
    run's prepared items table."""
    prepared = prepared or PreparedData(run_dir)
    return prepared.run.sids(modality, prepared.num_items, folder)
