"""A training order that a run killed mid-epoch can pick up exactly where it stopped.

A DataLoader with ``shuffle=True`` draws a new permutation from the global RNG every epoch and keeps no
record of how far it got, so a resumed run cannot tell which samples the lost part of the epoch had already
used. Here the order of an epoch is a pure function of ``(seed, epoch)`` (:class:`EpochSampler`), and the
loader counts the batches it has handed out (:class:`ResumableDataLoader`). Lightning stores that count in
every checkpoint (the fit loop saves ``state_dict()`` of each training loader that has one, see
``FitLoop.on_save_checkpoint``) and gives it back through ``load_state_dict()`` on resume; the loader then
starts the same epoch's order past the batches already trained on, without loading them.

:class:`EpochSampler` can also group samples of similar length into the same batches (as Hugging Face's
``group_by_length`` does): padding to the longest row then costs little, which matters for the LLM
recommender, whose prompts grow with the history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

CHUNK_BATCHES = 50
"""Batches per mega-chunk when grouping by length: large enough that a chunk holds many lengths to sort,
small enough that the chunks, drawn at random, keep the epoch's order random."""


def _epoch_seed(seed: int, epoch: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, epoch])


class EpochSampler(Sampler[int]):
    """Sample indices in an order that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every training epoch. The order is a permutation of
    ``range(size)``; with ``lengths`` it is arranged so that consecutive runs of ``batch_size`` indices
    (the batches a ``DataLoader(batch_size=...)`` cuts) hold samples of similar length: the permutation is
    split into mega-chunks of ``chunk_batches`` batches, each chunk is sorted by length (longest first) and
    cut into batches, and the full batches are put in random order. The one short batch, if ``size`` is
    not a multiple of ``batch_size``, comes last, so that every batch before it is full and skipping ``k``
    batches is skipping ``k * batch_size`` indices.

    Args:
        size: number of samples.
        seed: seed of the order; epoch ``e`` uses ``SeedSequence([seed, e])``.
        batch_size: the loader's batch size (used only to group by length).
        lengths: per-sample length to group by, or None for a plain shuffle.
        chunk_batches: batches per mega-chunk when grouping.
    """

    def __init__(
        self, size: int, seed: int, batch_size: int = 1, lengths: Sequence[int] | np.ndarray | None = None,
        chunk_batches: int = CHUNK_BATCHES,
    ) -> None:
        if batch_size < 1 or chunk_batches < 1:
            raise ValueError(f"batch_size and chunk_batches must be at least 1, got {batch_size} and {chunk_batches}")
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} samples")
        self.size = size
        self.seed = int(seed)
        self.batch_size = batch_size
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.chunk_batches = chunk_batches
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, count: int) -> None:
        """Let the next iteration start ``count`` indices into the epoch's order (once)."""
        self._start = int(count)

    def order(self, epoch: int) -> np.ndarray:
        """The whole order of ``epoch``, an ``int64`` permutation of ``range(size)``."""
        rng = np.random.default_rng(_epoch_seed(self.seed, epoch))
        order = rng.permutation(self.size)
        if self.lengths is None:
            return order
        chunk = self.chunk_batches * self.batch_size
        batches: list[np.ndarray] = []
        for start in range(0, self.size, chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches.extend(part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size))
        full = [batch for batch in batches if len(batch) == self.batch_size]
        short = [batch for batch in batches if len(batch) < self.batch_size]
        full = [full[i] for i in rng.permutation(len(full))]
        return np.concatenate(full + short) if batches else order

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        yield from self.order(self.epoch)[start:].tolist()

    def __len__(self) -> int:
        return self.size


class ResumableDataLoader(DataLoader):
    """A training DataLoader over an :class:`EpochSampler` whose position survives a checkpoint.

    ``state_dict()`` is ``{"epoch", "batches"}``: the epoch of the latest iteration and how many batches it
    has yielded (counted here, after any worker prefetching, so the count is what training consumed).
    ``load_state_dict()`` makes the next iteration of that same epoch skip those batches; an iteration of
    another epoch (a checkpoint taken at an epoch's end, resumed into the next) starts from the beginning.
    The loader's own generator is reseeded from ``(seed, epoch)`` at every iteration: creating an iterator
    then draws nothing from the global RNG (a resumed run creates it at a different moment than an
    uninterrupted one), and worker seeds are as reproducible as the order.
    """

    sampler: EpochSampler

    def __init__(
        self, dataset: Dataset, sampler: EpochSampler, batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None, **kwargs: Any,
    ) -> None:
        if sampler.lengths is not None and sampler.batch_size != batch_size:
            raise ValueError(f"sampler groups batches of {sampler.batch_size}, loader cuts batches of {batch_size}")
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, **kwargs)
        self._epoch = 0
        self._batches = 0
        self._resume: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self) -> Iterator[Any]:
        # a generator: nothing runs until the first batch is asked for, by which time Lightning has called
        # set_epoch (it creates the first epoch's iterator before it does)
        sampler = self.sampler
        self._epoch, self._batches = sampler.epoch, 0
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            if epoch == sampler.epoch:
                sampler.skip_next(batches * self.batch_size)
                self._batches = batches
        self.generator.manual_seed(int(_epoch_seed(sampler.seed, sampler.epoch).generate_state(1)[0]))
        for batch in super().__iter__():
            self._batches += 1
            yield batch
