"""Metrics per slice of the test users: where a model works, not only how well on average.

One figure over all users hides the long tail and cold start, which is where semantic IDs are claimed to
help (issue 16). A user belongs to slices through the held-out target and the history:

- **Popularity** of the target in the *training* interactions (what a model could learn from): items are
  ordered by training count and cut by the cumulative share of training interactions. With shares
  ``[0.25, 0.75]``, ``head`` is the most popular items that together hold the first 25% of them, ``torso``
  the next 50%, ``tail`` the rest. An item's place is the share held by strictly more popular items, so
  items of equal count always share a slice (no arbitrary cut through a tie).
- ``new``: the target never occurs in training. Kept apart from ``tail``: no model has a trained row for it.
- **History length** buckets: bounds ``[1, 5, 10]`` give ``history 1-4``, ``history 5-9``, ``history 10+``.

Slices are computed from the per-user ranks of :func:`~mmrec.evaluation.evaluate.evaluate` with the same
:class:`~mmrec.metrics.ranking.RankingMetrics`, so a slice's figure is exactly the overall figure
restricted to its users, for every model (scores or a top-k list). Membership depends only on the prepared
data, so a specification that leaves a slice empty is refused before any model is run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmrec.errors import InputError
from mmrec.metrics.ranking import RankingMetrics

POPULARITY = ("head", "torso", "tail")
NEW = "new"
DEFAULT_SHARES = (0.25, 0.75)
DEFAULT_HISTORY_BUCKETS = (1, 5, 10)


def check_spec(shares: Sequence[float], history_buckets: Sequence[int]) -> None:
    """Refuse a malformed specification up front, with one line naming the option."""
    if len(shares) != 2 or not 0 < shares[0] < shares[1] < 1:
        raise InputError(f"--slice_shares must be two shares 0 < a < b < 1 (head up to a, torso up to b), got {list(shares)}")
    if not history_buckets or min(history_buckets) < 0 or list(history_buckets) != sorted(set(history_buckets)):
        raise InputError(f"--history_buckets must be strictly increasing lengths >= 0, got {list(history_buckets)}")


def popularity_labels(train_counts: np.ndarray, shares: Sequence[float]) -> np.ndarray:
    """The slice name of every item: head, torso or tail by cumulative training share; new if never trained on."""
    counts = np.asarray(train_counts, dtype=np.int64)
    total = counts.sum()
    if total == 0:
        return np.full(len(counts), NEW, dtype=object)
    levels, level_of, items_per_level = np.unique(counts, return_inverse=True, return_counts=True)  # ascending
    held_above = (total - np.cumsum(levels * items_per_level)) / total  # share of items strictly more popular
    before = held_above[level_of]
    labels = np.array(POPULARITY, dtype=object)[np.searchsorted(np.asarray(shares), before, side="right")]
    labels[counts == 0] = NEW
    return labels


def history_label(length: int, bounds: Sequence[int]) -> str | None:
    """``history lo-hi`` for the bucket holding ``length`` (``lo+`` for the last); None below the first."""
    index = int(np.searchsorted(np.asarray(bounds), length, side="right")) - 1
    if index < 0:
        return None
    low = bounds[index]
    if index == len(bounds) - 1:
        return f"history {low}+"
    high = bounds[index + 1] - 1
    return f"history {low}" if high == low else f"history {low}-{high}"


@dataclass(frozen=True)
class SliceSpec:
    """Which users fall in which slice, by ``user_idx``; built from the prepared data before evaluating."""

    members: dict[str, np.ndarray]  # slice name -> sorted user_idx of its users
    shares: tuple[float, float]
    history_buckets: tuple[int, ...]

    @classmethod
    def build(
        cls,
        train_counts: np.ndarray,
        histories: Sequence[np.ndarray],
        targets: np.ndarray,
        shares: Sequence[float] = DEFAULT_SHARES,
        history_buckets: Sequence[int] = DEFAULT_HISTORY_BUCKETS,
    ) -> SliceSpec:
        """Slice the users of a split (``histories``, ``targets`` indexed by ``user_idx``).

        Raises InputError when a popularity or history slice would hold no user, or a history is shorter
        than the first bucket: a figure over nobody is not a figure. ``new`` may be empty (it is a property
        of the data, not of the specification) and is then recorded with its count alone.
        """
        check_spec(shares, history_buckets)
        item_labels = popularity_labels(train_counts, shares)[np.asarray(targets, dtype=np.int64)]
        lengths = np.array([len(history) for history in histories])
        short = int((lengths < history_buckets[0]).sum())
        if short:
            raise InputError(
                f"--history_buckets {list(history_buckets)}: {short} users have a history shorter than "
                f"{history_buckets[0]}; start the first bucket at {int(lengths.min())} or lower"
            )
        history_labels = np.array([history_label(int(n), history_buckets) for n in lengths], dtype=object)
        names = [*POPULARITY, NEW, *(history_label(b, history_buckets) for b in history_buckets)]
        members = {name: np.flatnonzero((item_labels == name) | (history_labels == name)) for name in names}
        empty = [name for name in names if name != NEW and not len(members[name])]
        if empty:
            raise InputError(
                f"slices {empty} hold no user (--slice_shares {list(shares)}, --history_buckets "
                f"{list(history_buckets)}): choose cuts that leave every slice some users"
            )
        return cls(members, (float(shares[0]), float(shares[1])), tuple(int(b) for b in history_buckets))

    def membership(self, users: np.ndarray) -> dict[str, np.ndarray]:
        """``{"user_idx": ..., "slice": ...}`` columns: one row per user of ``users`` and slice it belongs to,
        slice by slice in :attr:`members` order (``slices.parquet`` of a test folder)."""
        rows = [(members[np.isin(members, users)], name) for name, members in self.members.items()]
        return {
            "user_idx": np.concatenate([np.asarray(users_of, dtype=np.int32) for users_of, _ in rows]),
            "slice": np.array([name for users_of, name in rows for _ in users_of], dtype=object),
        }

    def record(self) -> dict[str, object]:
        """How the slices were cut, for ``metrics.json``'s protocol."""
        return {
            "popularity": "target's interactions in the training split; items ordered by count, cut by the "
                          "cumulative share held by more popular items; equal counts share a slice",
            "shares": list(self.shares),
            "new": "target never occurs in the training split",
            "history_buckets": list(self.history_buckets),
        }


def slice_metrics(spec: SliceSpec, users: np.ndarray, ranks: np.ndarray, k: Sequence[int]) -> dict[str, dict[str, float | int]]:
    """``{slice: {metric: value, "users": n}}`` from the evaluated users' ranks (``users[i]`` has ``ranks[i]``)."""
    position = {int(user): i for i, user in enumerate(users)}
    result: dict[str, dict[str, float | int]] = {}
    for name, members in spec.members.items():
        rows = [position[int(user)] for user in members if int(user) in position]
        values: dict[str, float | int] = {}
        if rows:
            metric = RankingMetrics(k)
            metric.update(torch.from_numpy(np.asarray(ranks, dtype=np.float64)[rows]))
            values = {metric_name: float(value) for metric_name, value in metric.compute().items()}
        result[name] = {**values, "users": len(rows)}
    return result
