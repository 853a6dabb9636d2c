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

Under DDP (``--trainer.devices N --trainer.strategy ddp``) the sampler shards the epoch's order itself: batch
``j`` of the order goes to rank ``j % world`` (length-grouped batches stay whole) and the leftover tail is
split evenly, so every rank yields the same number of batches (a rank with one batch more would wait
forever in the gradient all-reduce of a step the others never take). It is a
:class:`~torch.utils.data.DistributedSampler`, which is what makes Lightning leave the loader alone: for any
other sampler Lightning rebuilds the loader around its own ``DistributedSampler``, which neither knows the
epoch's order nor can be resumed (and which a DataLoader subclass like :class:`ResumableDataLoader` cannot
be re-created with). :func:`eval_sampler` gives the validation, test and prediction loaders the matching
unpadded shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

CHUNK_BATCHES = 50
"""Batches per mega-chunk when grouping by length: large enough that a chunk holds many lengths to sort,
small enough that the chunks, drawn at random, keep the epoch's order random."""


def _epoch_seed(seed: int, epoch: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, epoch])


def world() -> tuple[int, int]:
    """``(num_replicas, rank)`` of the initialised default process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def eval_sampler(size: int) -> DistributedSampler | None:
    """The sampler of a validation, test or prediction loader: None (sequential) in a single process, under
    DDP this rank's unpadded shard (Lightning's ``UnrepeatedDistributedSampler``: ranks may get one sample
    more or less, none twice), so that sum-reduced metrics (:class:`mmrec.metrics.ranking.RankingMetrics`)
    count every user exactly once. Evaluation steps hold no collective, so unequal batch counts are safe."""
    replicas, rank = world()
    if replicas == 1:
        return None
    return UnrepeatedDistributedSampler(range(size), num_replicas=replicas, rank=rank, shuffle=False)


def eval_batch_counts(size: int, batch_size: int, replicas: int) -> list[int]:
    """Batches each rank's :func:`eval_sampler` shard makes (rank ``r`` holds samples ``r, r + replicas, ...``):
    equal for every rank unless one rank's extra sample starts a batch of its own."""
    return [math.ceil(len(range(rank, size, replicas)) / batch_size) for rank in range(replicas)]


def equal_count_batch_size(size: int, batch_size: int, replicas: int, rank: int) -> int | None:
    """The batch size at which ``rank``'s evaluation shard makes as many batches as the largest shard does at
    ``batch_size``; None where no batch size does.

    Under FSDP every forward is a collective, so the ranks must run equally many evaluation batches, and the
    unpadded shards (padding would count users twice) can differ by one batch: 65 users at 32 on 2 ranks are
    33 and 32 users, 2 batches and 1. The smaller shard then takes batches of 31 (2 batches). A user's scores do
    not depend on the batch it is in, so the metrics are unchanged."""
    counts = eval_batch_counts(size, batch_size, replicas)
    target, users = max(counts), len(range(rank, size, replicas))
    for smaller in range(batch_size, 0, -1):
        batches = math.ceil(users / smaller)
        if batches >= target:
            return smaller if batches == target else None
    return None


class EpochSampler(DistributedSampler):
    """Sample indices in an order that depends only on ``(seed, epoch)``; under DDP, this rank's share of it.

    Lightning calls :meth:`set_epoch` before every training epoch. The order is a permutation of
    ``range(size)``; with ``lengths`` it is arranged so that consecutive runs of ``batch_size`` indices
    (the batches a ``DataLoader(batch_size=...)`` cuts) hold samples of similar length: the permutation is
    split into mega-chunks of ``chunk_batches`` batches, each chunk is sorted by length (longest first) and
    cut into batches, and the full batches are put in random order. The one short batch, if ``size`` is
    not a multiple of ``batch_size``, comes last, so that every batch before it is full and skipping ``k``
    batches is skipping ``k * batch_size`` indices. Under DDP the unit put in random order is a run of
    ``num_replicas`` adjacent batches of one sorted chunk, so the ranks of one step get batches of similar
    length: a DDP step lasts as long as its slowest rank (bench/RESULTS.md, session 5, measured 2 GPUs at
    1.5x one with random pairs). With one replica the unit is one batch, as before.

    With ``num_replicas`` ranks the order is cut into batches of ``batch_size`` and shared out at the batch
    level: of the first ``num_replicas * (full_batches // num_replicas)`` full batches, batch ``j`` goes to rank
    ``j % num_replicas``. The leftover (the remaining full batches and the short one) is split into
    ``num_replicas`` equal contiguous parts, one more batch per rank; when it does not divide evenly, its first
    samples are repeated, as few as needed (fewer than ``num_replicas``; as torch's ``DistributedSampler`` pads).
    Every rank thus yields the same number of samples, hence of batches, every batch but its last is full,
    the ranks' shares are disjoint apart from those few repeats, and together they cover the epoch. With one
    replica this is the whole order, unchanged. The loader must cut batches of ``batch_size`` for the shares
    to be whole batches (equal counts hold whatever it cuts).

    It subclasses :class:`~torch.utils.data.DistributedSampler` so that Lightning does not replace it (see
    the module docstring); of that class it keeps only ``num_replicas``, ``rank``, ``seed`` and ``epoch``.

    Args:
        size: number of samples.
        seed: seed of the order; epoch ``e`` uses ``SeedSequence([seed, e])``.
        batch_size: the loader's batch size (the unit of grouping by length and of sharding).
        lengths: per-sample length to group by, or None for a plain shuffle.
        chunk_batches: batches per mega-chunk when grouping (rounded up to a multiple of ``num_replicas``).
        num_replicas: number of ranks; None: the initialised process group's world size, or 1.
        rank: this rank; None: the process group's rank, or 0.
    """

    def __init__(
        self, size: int, seed: int, batch_size: int = 1, lengths: Sequence[int] | np.ndarray | None = None,
        chunk_batches: int = CHUNK_BATCHES, num_replicas: int | None = None, rank: int | None = None,
    ) -> None:
        if batch_size < 1 or chunk_batches < 1:
            raise ValueError(f"batch_size and chunk_batches must be at least 1, got {batch_size} and {chunk_batches}")
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} samples")
        replicas, own_rank = world()
        super().__init__(
            range(size), num_replicas=replicas if num_replicas is None else num_replicas,
            rank=own_rank if rank is None else rank, shuffle=True, seed=int(seed),
        )
        self.size = size
        self.batch_size = batch_size
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.chunk_batches = chunk_batches
        self._start = 0

    def skip_next(self, count: int) -> None:
        """Let the next iteration start ``count`` indices into this rank's share of the epoch (once)."""
        self._start = int(count)

    def order(self, epoch: int) -> np.ndarray:
        """The whole order of ``epoch`` (all ranks), an ``int64`` permutation of ``range(size)``; with
        ``lengths``, each run of ``num_replicas`` batches (one step's) is of similar length."""
        rng = np.random.default_rng(_epoch_seed(self.seed, epoch))
        order = rng.permutation(self.size)
        if self.lengths is None:
            return order
        size, replicas = self.batch_size, self.num_replicas
        chunk = -(-self.chunk_batches // replicas) * replicas * size  # whole steps in every chunk but the last
        steps: list[list[np.ndarray]] = []  # runs of `replicas` length-adjacent full batches: one DDP step
        loose: list[np.ndarray] = []  # the last chunk's full batches that make no whole step
        short: list[np.ndarray] = []
        for start in range(0, self.size, chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            cut = [part[i:i + size] for i in range(0, len(part), size)]
            full = [batch for batch in cut if len(batch) == size]
            short.extend(batch for batch in cut if len(batch) < size)
            whole = len(full) // replicas * replicas
            steps.extend(full[i:i + replicas] for i in range(0, whole, replicas))
            loose.extend(full[whole:])
        whole = len(loose) // replicas * replicas
        steps.extend(loose[i:i + replicas] for i in range(0, whole, replicas))
        steps = [steps[i] for i in rng.permutation(len(steps))]
        batches = [batch for step in steps for batch in step] + loose[whole:] + short
        return np.concatenate(batches) if batches else order

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's share of ``order(epoch)`` (the whole order with one replica)."""
        order = self.order(epoch)
        if self.num_replicas == 1:
            return order
        replicas, size = self.num_replicas, self.batch_size
        rounds = self.size // size // replicas  # batches each rank gets before the leftover
        dealt = order[:rounds * replicas * size].reshape(rounds, replicas, size)[:, self.rank].reshape(-1)
        leftover = order[rounds * replicas * size:]
        if len(leftover) == 0:
            return dealt
        part = -(-len(leftover) // replicas)
        leftover = np.concatenate([leftover, leftover[:part * replicas - len(leftover)]])
        return np.concatenate([dealt, leftover[self.rank * part:(self.rank + 1) * part]])

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        yield from self.shard(self.epoch)[start:].tolist()

    def __len__(self) -> int:
        """Samples this rank yields in an epoch (equal on every rank)."""
        replicas, size = self.num_replicas, self.batch_size
        rounds = self.size // size // replicas
        return rounds * size + -(-(self.size - rounds * replicas * size) // replicas)


class ResumableDataLoader(DataLoader):
    """A training DataLoader over an :class:`EpochSampler` whose position survives a checkpoint.

    ``state_dict()`` is ``{"epoch", "batches"}``: the epoch of the latest iteration and how many batches it
    has yielded (counted here, after any worker prefetching, so the count is what training consumed). Under
    DDP that is this rank's count, the same on every rank, so rank 0's state, which the checkpoint holds,
    is every rank's position.
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
