"""Ranks of held-out targets and the Top-K metrics computed from them.

Every model in mmrec is judged by these functions, so the rules are fixed here once:

- **Rank**: 1-based position of the target in the model's ranking of the whole catalog.
- **Ties are pessimistic**: rank = 1 + #items scored strictly higher + #OTHER items scored equal. A model
  that gives every item the same score therefore ranks every target last and earns nothing; an optimistic
  or random tie-break would credit it with chance-level hits, and a degenerate model (collapsed
  embeddings, a popularity table with many equal counts) would look better than it is.
- **Recall@K** = 1[rank <= K] (one target per user, so it equals HR@K), **NDCG@K** = 1/log2(rank + 1) if
  rank <= K else 0 (one relevant item: the ideal DCG is 1), **MRR** = 1/rank with no cutoff.

The metric keeps only sums and a count (``dist_reduce_fx="sum"``), so per-process results add up exactly
when torchmetrics synchronises them across devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

DEFAULT_K = (5, 10, 20)


def target_ranks(scores: Tensor, target: Tensor) -> Tensor:
    """Pessimistic 1-based rank of each row's target: ``scores [B, N]`` (higher is better), ``target [B]``.

    Counting ``scores >= score(target)`` counts the target itself once plus every item that beats or ties
    it, which is the pessimistic rule in one pass. A NaN target score ranks last.
    """
    target_score = scores.gather(1, target[:, None])
    ranks = (scores >= target_score).sum(dim=1).to(torch.float64)
    return torch.where(target_score[:, 0].isnan(), float(scores.shape[1]), ranks)


def list_ranks(items: Tensor, scores: Tensor, target: Tensor) -> Tensor:
    """Ranks for models that return only a ranked list: ``items [B, k]`` (-1 = empty slot), ``scores [B, k]``.

    A target in the list gets its pessimistic rank among the listed items; a target absent from the list
    gets ``inf`` (rank > k: no Recall/NDCG credit at any K <= k, and no MRR credit).
    """
    valid = items >= 0
    hit = (items == target[:, None]) & valid
    target_score = torch.where(hit, scores, torch.full_like(scores, -torch.inf)).amax(dim=1, keepdim=True)
    ranks = ((scores >= target_score) & valid).sum(dim=1).to(torch.float64)
    return torch.where(hit.any(dim=1), ranks, torch.inf)


class RankingMetrics(Metric):
    """Recall@K and NDCG@K for each K, and MRR, accumulated from target ranks.

    ``update(ranks)`` takes the ranks from :func:`target_ranks` or :func:`list_ranks`; ``compute()``
    returns ``{"recall@5": ..., "ndcg@5": ..., ..., "mrr": ...}`` averaged over every rank seen.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, k: Sequence[int] = DEFAULT_K, **kwargs) -> None:
        super().__init__(**kwargs)
        if not k or min(k) < 1:
            raise ValueError(f"cutoffs must be positive integers, got {list(k)}")
        self.k = tuple(sorted({int(x) for x in k}))
        self.add_state("recall_sum", default=torch.zeros(len(self.k), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ndcg_sum", default=torch.zeros(len(self.k), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rr_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ranks: Tensor) -> None:
        ranks = ranks.to(self.recall_sum.device, torch.float64).reshape(-1)
        cutoffs = torch.tensor(self.k, dtype=torch.float64, device=ranks.device)[:, None]
        within = ranks[None, :] <= cutoffs
        gain = torch.where(within, 1.0 / torch.log2(ranks + 1.0), 0.0)
        self.recall_sum += within.sum(dim=1)
        self.ndcg_sum += gain.sum(dim=1)
        self.rr_sum += (1.0 / ranks).sum()
        self.count += ranks.numel()

    def compute(self) -> dict[str, Tensor]:
        count = self.count.to(torch.float64)
        values = {}
        for i, k in enumerate(self.k):
            values[f"recall@{k}"] = self.recall_sum[i] / count
            values[f"ndcg@{k}"] = self.ndcg_sum[i] / count
        values["mrr"] = self.rr_sum / count
        return values
