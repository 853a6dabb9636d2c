"""The top-K items of any trained model for a batch of histories, with some items excluded.

Shared by ``mmrec test`` (which excludes the user's earlier items except the held-out target under
``--mask_history true``) and ``mmrec recommend`` (which excludes the whole history under
``--exclude_history true``), so that what a user is recommended is exactly what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmrec.errors import InputError
from mmrec.evaluation.protocol import AnyRecommender, Recommender, TopKRecommender


@dataclass(frozen=True)
class TopK:
    """``items [B, k]`` (-1: an empty slot of a list model) and their ``scores [B, k]``, best first.

    ``all_scores [B, num_items]`` is the full score matrix (excluded items at -inf) of a scoring model, which
    the evaluator needs to rank targets beyond ``k``; None for a list model.
    """

    items: Tensor
    scores: Tensor
    all_scores: Tensor | None


def history_items(batch: dict[str, Tensor], num_items: int) -> Tensor:
    """``[B, num_items]`` True for every item of each row's history (padding excluded)."""
    history, mask = batch["history"], batch["mask"]
    seen = torch.zeros(len(history), num_items + 1, dtype=torch.bool, device=history.device)
    seen.scatter_(1, torch.where(mask, history, num_items), True)  # padding goes to the spare last column
    return seen[:, :num_items]


def top_by_scores(model: Recommender, batch: dict[str, Tensor], k: int, num_items: int, exclude: Tensor | None) -> TopK:
    """Score every item, drop ``exclude [B, num_items]`` (True: never recommend), keep the best ``k``."""
    rows = len(batch["history"])
    scores = model.score_batch(batch)
    if scores.shape != (rows, num_items):
        raise InputError(
            f"{type(model).__name__}.score_batch returned shape {tuple(scores.shape)}, expected "
            f"({rows}, {num_items}): was the model trained on another item table?"
        )
    if exclude is not None:
        scores = scores.masked_fill(exclude, -torch.inf)
    top_scores, top_items = scores.topk(k, dim=1)
    return TopK(top_items, top_scores, scores)


def top_by_list(model: TopKRecommender, batch: dict[str, Tensor], k: int, num_items: int, exclude: Tensor | None) -> TopK:
    """A list model's best ``k``; with exclusions it is asked for one extra item per history slot, so that
    ``k`` remain after the excluded ones are dropped (moved to the end as empty slots)."""
    extra = batch["history"].shape[1] if exclude is not None else 0
    items, scores = model.topk_batch(batch, k + extra)
    if exclude is not None:
        drop = exclude.gather(1, items.clamp(min=0)) & (items >= 0)
        order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)
        items = items.masked_fill(drop, -1).gather(1, order)
        scores = scores.masked_fill(drop, -torch.inf).gather(1, order)
    return TopK(items[:, :k], scores[:, :k].float(), None)


def top_k(model: AnyRecommender, batch: dict[str, Tensor], k: int, num_items: int, exclude: Tensor | None = None) -> TopK:
    """The best ``k`` items per row from whichever method the model has (scoring preferred: it is exact)."""
    if isinstance(model, Recommender):
        return top_by_scores(model, batch, k, num_items, exclude)
    return top_by_list(model, batch, k, num_items, exclude)
