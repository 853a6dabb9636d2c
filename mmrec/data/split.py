"""Per-user positions: keeping the most recent items, the leave-one-out split, and the new-item protocol.

The functions take the user code of every interaction with each user's interactions contiguous and in
chronological order, which is how ``prepare`` holds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmrec.errors import InputError

MIN_SPLIT_LENGTH = 3
"""Leave-one-out needs one training, one validation and one test item."""


def positions(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(position, length)`` of every interaction: its 0-based rank within its user and that user's count."""
    if len(users) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    length = np.repeat(counts, counts)
    position = np.arange(len(users)) - np.repeat(starts, counts)
    return position, length


def keep_most_recent(users: np.ndarray, max_history: int | None) -> np.ndarray:
    """Mask keeping each user's last ``max_history`` interactions (all of them when ``None``)."""
    if max_history is None:
        return np.ones(len(users), dtype=bool)
    position, length = positions(users)
    return position >= length - max_history


def leave_one_out(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(position, split)``: the last interaction of a user is ``test``, the second-last ``valid``, the rest
    ``train``. Every user must have at least :data:`MIN_SPLIT_LENGTH` interactions."""
    position, length = positions(users)
    if len(length) and length.min() < MIN_SPLIT_LENGTH:
        raise ValueError(f"leave-one-out needs at least {MIN_SPLIT_LENGTH} interactions per user")
    split = np.where(position == length - 1, "test", np.where(position == length - 2, "valid", "train"))
    return position, split


@dataclass(frozen=True)
class SplitOptions:
    """How the data is split beyond leave-one-out.

    Args:
        new_items: share of items, drawn at random with the stage's seed, that become "new": their
            interactions are removed from the training part of every sequence and from validation targets,
            but kept as test targets, and their content stays in the item table. This measures what leave-one-out
            alone never does: ranking items that appeared after training (cold start), where semantic IDs
            shared with similar old items are meant to help. 0 (the default) holds nothing out.
    """

    new_items: float = 0.0

    def check(self) -> None:
        """Fail on a share that cannot be meant, before any input is read."""
        share = self.new_items
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise InputError(f"split.new_items must be a share in [0, 1), got {share!r}")


def hold_out_new_items(
    users: np.ndarray, items: np.ndarray, num_items: int, share: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, new)``: the interactions to keep and the sorted codes of the items made new.

    ``round(share * num_items)`` items are drawn without replacement. A new item's interactions are dropped
    except where it is a user's last (test) item; users left with fewer than :data:`MIN_SPLIT_LENGTH`
    interactions, which leave-one-out cannot split, are dropped whole. Re-splitting what is kept then
    leaves every new item out of training and validation, and each test target where it was.
    """
    rng = np.random.default_rng(seed)
    new = np.sort(rng.choice(num_items, size=round(share * num_items), replace=False))
    position, length = positions(users)
    keep = ~np.isin(items, new) | (position == length - 1)
    kept_per_user = np.bincount(users[keep], minlength=int(users.max(initial=-1)) + 1)
    return keep & (kept_per_user[users] >= MIN_SPLIT_LENGTH), new
