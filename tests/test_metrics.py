"""Ranks and Top-K metrics against hand-computed values: ties, targets outside the top K, MRR, NDCG."""

from __future__ import annotations

import math

import pytest
import torch

from mmrec.metrics.ranking import RankingMetrics, list_ranks, target_ranks


def test_rank_counts_items_scored_higher() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.3], [0.9, 0.5, 0.1, 0.3]])
    assert target_ranks(scores, torch.tensor([0, 2])).tolist() == [1.0, 4.0]


def test_ties_are_pessimistic() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [3.0]


def test_constant_scores_rank_every_target_last() -> None:
    scores = torch.zeros(3, 50)
    assert target_ranks(scores, torch.tensor([0, 17, 49])).tolist() == [50.0, 50.0, 50.0]


def test_nan_target_score_ranks_last() -> None:
    scores = torch.tensor([[0.2, float("nan"), 0.1]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [3.0]


def test_metric_values_by_hand() -> None:
    metric = RankingMetrics(k=[5, 10, 20])
    metric.update(torch.tensor([1.0, 3.0, 7.0, 25.0]))
    values = {name: float(v) for name, v in metric.compute().items()}
    assert values["recall@5"] == pytest.approx(2 / 4)
    assert values["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert values["recall@10"] == pytest.approx(3 / 4)
    assert values["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(8)) / 4)
    assert values["recall@20"] == pytest.approx(3 / 4)  # rank 25 is outside every cutoff
    assert values["ndcg@20"] == pytest.approx(values["ndcg@10"])
    assert values["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 7 + 1 / 25) / 4)  # MRR has no cutoff


def test_scores_to_metrics_with_ties_and_a_miss() -> None:
    # user 0: target scored highest -> rank 1; user 1: target ties with two others -> rank 3;
    # user 2: target is last of 12 items -> outside top 10.
    scores = torch.tensor([
        [5.0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [3.0, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1],
        [12.0, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1],
    ])
    ranks = target_ranks(scores, torch.tensor([0, 2, 11]))
    assert ranks.tolist() == [1.0, 4.0, 12.0]
    metric = RankingMetrics(k=[1, 10])
    metric.update(ranks)
    values = {name: float(v) for name, v in metric.compute().items()}
    assert values["recall@1"] == pytest.approx(1 / 3)
    assert values["recall@10"] == pytest.approx(2 / 3)
    assert values["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert values["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 12) / 3)


def test_list_ranks_count_a_missing_target_as_beyond_the_list() -> None:
    items = torch.tensor([[3, 1, 2], [4, 5, 6], [7, 8, -1]])
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7], [0.5, 0.5, float("nan")]])
    ranks = list_ranks(items, scores, torch.tensor([1, 9, 7]))
    assert ranks.tolist() == [2.0, math.inf, 2.0]  # last: tie with item 8 is pessimistic, the empty slot is ignored
    metric = RankingMetrics(k=[1, 3])
    metric.update(ranks)
    values = {name: float(v) for name, v in metric.compute().items()}
    assert values["recall@1"] == 0.0
    assert values["recall@3"] == pytest.approx(2 / 3)
    assert values["mrr"] == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)


def test_sums_reduce_across_processes_like_one_pass() -> None:
    ranks = torch.tensor([1.0, 2.0, 5.0, 11.0, 40.0, 3.0, 1.0])
    whole, first, second = RankingMetrics(), RankingMetrics(), RankingMetrics()
    whole.update(ranks)
    first.update(ranks[:3])
    second.update(ranks[3:])
    first.merge_state(second)  # what dist_reduce_fx="sum" does across processes
    for name, value in whole.compute().items():
        assert float(first.compute()[name]) == pytest.approx(float(value))


def test_cutoffs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RankingMetrics(k=[0, 5])
