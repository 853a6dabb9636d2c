"""The evaluation loop behind ``mmrec test``: rank every user's held-out item, accumulate the metrics.

It is a plain loop over ``SequenceDataModule``'s evaluation batches rather than ``Trainer.test``: Lightning
pads distributed evaluation shards by repeating users, which would count some users twice, and the
Trainer's start-up costs more than a full-ranking pass over Beauty takes on a CPU. The metric itself is
the torchmetrics :class:`~mmrec.metrics.ranking.RankingMetrics` that SASRec's validation uses under
Lightning, so the numbers of both paths come from one implementation. On several processes each evaluates
a disjoint shard of the users (:func:`split_loader`'s ``shard``), the metric's sums are reduced across them
by torchmetrics, and :func:`merge` joins the shards' predictions.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from mmrec.artifacts.schemas import PREDICTIONS
from mmrec.data.datamodules import SequenceDataModule
from mmrec.errors import InputError
from mmrec.evaluation.protocol import AnyRecommender, Recommender, TopKRecommender
from mmrec.evaluation.topk import history_items, top_by_list, top_by_scores
from mmrec.metrics.ranking import DEFAULT_K, RankingMetrics, list_ranks, target_ranks


@dataclass(frozen=True)
class Evaluation:
    """Metrics over all evaluated users, their top-K lists, and how they were obtained.

    ``ranks`` holds each user's target rank, aligned with the rows of ``predictions`` (``user_idx`` order), so
    metrics over any subset of users (slices) come from the very ranks the overall figures did.
    """

    metrics: dict[str, float]
    predictions: pa.Table
    ranks: np.ndarray
    n_users: int
    ranking: str
    seconds: float


def split_loader(
    run_dir: str, split: str, batch_size: int, shard: tuple[int, int] | None = None,
) -> tuple[DataLoader, SequenceDataModule]:
    """Evaluation batches of ``split`` carrying each user's complete history (models truncate it themselves).

    Users are batched in order of history length, so a batch is padded to about its own users' length
    rather than to the longest history of a random group: most Beauty histories hold under 10 items, a
    few hold 200, and padding would otherwise dominate the cost of encoding them. ``shard=(rank, world)``
    keeps every ``world``-th user of that order from ``rank`` on: disjoint shards, none repeated, of
    similar length profiles so no process waits long for the others.
    """
    if split not in ("valid", "test"):
        raise InputError(f"split must be 'valid' or 'test', got '{split}'")
    data = SequenceDataModule(run_dir=run_dir, max_len=sys.maxsize, eval_batch_size=batch_size)
    histories, _ = data.prepared.histories(split)
    by_length = np.argsort([len(history) for history in histories], kind="stable")
    if shard is not None:
        rank, world = shard
        if len(by_length) < world:
            raise InputError(f"devices: {world} processes for {len(by_length)} users of split '{split}'; use at most {len(by_length)}")
        by_length = by_length[rank::world]
    dataset = Subset(data.eval_dataset(split), by_length.tolist())
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=data.collate), data


def merge(parts: Sequence[Evaluation]) -> Evaluation:
    """One evaluation from the shards of several processes: predictions and ranks joined in ``user_idx``
    order. The metrics are the shards' own, which torchmetrics has already reduced over every process."""
    table = pa.concat_tables([part.predictions for part in parts])
    ranks = np.concatenate([part.ranks for part in parts])
    order = np.argsort(table.column("user_idx").to_numpy(), kind="stable")
    return Evaluation(
        metrics=parts[0].metrics,
        predictions=table.take(pa.array(order)),
        ranks=ranks[order],
        n_users=sum(part.n_users for part in parts),
        ranking=parts[0].ranking,
        seconds=max(part.seconds for part in parts),
    )


def seen_items(batch: dict[str, Tensor], num_items: int) -> Tensor:
    """``[B, num_items]`` True for items in the user's history, except the target (which must stay rankable)."""
    seen = history_items(batch, num_items)
    seen.scatter_(1, batch["target"][:, None], False)
    return seen


def rank_by_scores(
    model: Recommender, batch: dict[str, Tensor], k: int, num_items: int, mask_history: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Ranks over the full catalog and the top-``k`` items, from a score for every item."""
    top = top_by_scores(model, batch, k, num_items, seen_items(batch, num_items) if mask_history else None)
    return target_ranks(top.all_scores, batch["target"]), top.items, top.scores


def rank_by_list(
    model: TopKRecommender, batch: dict[str, Tensor], k: int, num_items: int, mask_history: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Ranks from a model's top-``k`` list; with history masking, ask for enough extra items to drop them."""
    top = top_by_list(model, batch, k, num_items, seen_items(batch, num_items) if mask_history else None)
    return list_ranks(top.items, top.scores, batch["target"]), top.items, top.scores


def predictions_table(users: np.ndarray, targets: np.ndarray, items: np.ndarray, scores: np.ndarray) -> pa.Table:
    """Rows of the PREDICTIONS schema; empty slots (item -1) of list models are left out of the lists."""
    keep = items >= 0
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    item_lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(items[keep].astype(np.int32)))
    score_lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores[keep].astype(np.float32)))
    return pa.table(
        {"user_idx": users.astype(np.int32), "target": targets.astype(np.int32), "items": item_lists, "scores": score_lists},
        schema=PREDICTIONS,
    )


def evaluate(
    model: AnyRecommender,
    batches: Iterable[dict[str, Tensor]],
    num_items: int,
    k: Sequence[int] = DEFAULT_K,
    mask_history: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> Evaluation:
    """Rank each batch's targets with ``model`` and return the metrics and top-``max(k)`` predictions.

    ``autocast_dtype`` runs the model under autocast (bf16 on a GPU: the precision the shipped configs train
    in, and the models compute their final scores in float32 regardless); None runs it as loaded.
    """
    device = torch.device(device)
    metric = RankingMetrics(k).to(device)
    top = min(max(metric.k), num_items)
    by_scores = isinstance(model, Recommender)
    rank = rank_by_scores if by_scores else rank_by_list
    if isinstance(model, torch.nn.Module):
        model.eval()
    parts: list[tuple[Tensor, ...]] = []
    start = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with torch.inference_mode(), autocast:
        for batch in tqdm(batches, desc="evaluating", unit="batch", leave=False, disable=not progress):
            batch = {name: value.to(device) for name, value in batch.items()}
            ranks, items, scores = rank(model, batch, top, num_items, mask_history)
            metric.update(ranks)
            parts.append(tuple(t.cpu() for t in (batch["user_idx"], batch["target"], items, scores, ranks)))
    if not parts:
        raise InputError("no users to evaluate")
    values = {name: float(value) for name, value in metric.compute().items()}
    users, targets, items, scores, ranks = (torch.cat(column).numpy() for column in zip(*parts))
    order = np.argsort(users, kind="stable")
    users, targets, items, scores, ranks = users[order], targets[order], items[order], scores[order], ranks[order]
    return Evaluation(
        metrics=values,
        predictions=predictions_table(users, targets, items, scores),
        ranks=ranks,
        n_users=len(users),
        ranking="scores" if by_scores else "top-k list",
        seconds=time.perf_counter() - start,
    )
