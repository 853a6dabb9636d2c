"""Metrics per slice (`mmrec test --slices true`): the cuts, a hand computation, consistency with the overall
figures, bad specifications, and the report's rendering of them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from mmrec.artifacts.schemas import SLICE_MEMBERS, read_table
from mmrec.cli import main as mmrec
from mmrec.data.datamodules import SequenceDataModule
from mmrec.errors import InputError
from mmrec.evaluation import registry
from mmrec.evaluation.evaluate import evaluate
from mmrec.evaluation.slices import SliceSpec, history_label, popularity_labels, slice_metrics

# every user gets the same scores, item 0 best: the target t ranks t + 1
SCORES = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
# training counts: item 0 holds the first 50% (head), item 1 starts at 50% (torso), item 2 at 80% (tail), 3 is new
COUNTS = np.array([5, 3, 2, 0, 0, 0])
LENGTHS = [1, 2, 5, 10]  # users 0-3, with target = user: one user per popularity slice


class FixedScores:
    def score_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return SCORES.expand(len(batch["target"]), -1)


class FixedList:
    """The top two items only: targets 2 and 3 fall beyond the list."""

    def topk_batch(self, batch: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = torch.full((len(batch["target"]), k), -1, dtype=torch.long)
        scores = torch.full((len(batch["target"]), k), -torch.inf)
        items[:, :2], scores[:, :2] = torch.tensor([0, 1]), SCORES[:2]
        return items, scores


def hand_batches() -> list[dict[str, torch.Tensor]]:
    width = max(LENGTHS)
    mask = torch.tensor([[i >= width - n for i in range(width)] for n in LENGTHS])
    return [{"user_idx": torch.tensor([3, 1]), "history": torch.zeros(2, width, dtype=torch.long),
             "mask": mask[[3, 1]], "target": torch.tensor([3, 1])},
            {"user_idx": torch.tensor([0, 2]), "history": torch.zeros(2, width, dtype=torch.long),
             "mask": mask[[0, 2]], "target": torch.tensor([0, 2])}]


def hand_spec() -> SliceSpec:
    return SliceSpec.build(COUNTS, [np.zeros(n) for n in LENGTHS], np.arange(4), [0.25, 0.75], [1, 5, 10])


def test_popularity_cut_by_cumulative_training_share() -> None:
    assert popularity_labels(COUNTS, [0.25, 0.75]).tolist() == ["head", "torso", "tail", "new", "new", "new"]
    assert popularity_labels(np.array([2, 2, 2, 2, 1]), [0.25, 0.75]).tolist() == ["head"] * 4 + ["tail"]  # ties share
    assert popularity_labels(COUNTS, [0.6, 0.9]).tolist()[:3] == ["head", "head", "torso"]


def test_history_bucket_names() -> None:
    assert [history_label(n, [1, 5, 10]) for n in (0, 1, 4, 5, 9, 10, 200)] == [
        None, "history 1-4", "history 1-4", "history 5-9", "history 5-9", "history 10+", "history 10+"]
    assert history_label(1, [1, 2]) == "history 1"


def test_slices_equal_a_hand_computation() -> None:
    evaluation = evaluate(FixedScores(), hand_batches(), len(SCORES), k=[1, 3])
    assert evaluation.ranks.tolist() == [1, 2, 3, 4]  # aligned with predictions' user_idx order
    sliced = slice_metrics(hand_spec(), evaluation.predictions.column("user_idx").to_numpy(), evaluation.ranks, [1, 3])
    inv = 1 / math.log2(3)
    expected = {
        "head": {"recall@1": 1, "ndcg@1": 1, "recall@3": 1, "ndcg@3": 1, "mrr": 1, "users": 1},
        "torso": {"recall@1": 0, "ndcg@1": 0, "recall@3": 1, "ndcg@3": inv, "mrr": 1 / 2, "users": 1},
        "tail": {"recall@1": 0, "ndcg@1": 0, "recall@3": 1, "ndcg@3": 1 / 2, "mrr": 1 / 3, "users": 1},
        "new": {"recall@1": 0, "ndcg@1": 0, "recall@3": 0, "ndcg@3": 0, "mrr": 1 / 4, "users": 1},
        "history 1-4": {"recall@1": 1 / 2, "ndcg@1": 1 / 2, "recall@3": 1, "ndcg@3": (1 + inv) / 2, "mrr": 3 / 4, "users": 2},
        "history 5-9": {"recall@1": 0, "ndcg@1": 0, "recall@3": 1, "ndcg@3": 1 / 2, "mrr": 1 / 3, "users": 1},
        "history 10+": {"recall@1": 0, "ndcg@1": 0, "recall@3": 0, "ndcg@3": 0, "mrr": 1 / 4, "users": 1},
    }
    assert sliced == {name: pytest.approx(values) for name, values in expected.items()}


def test_list_models_are_sliced_from_their_list_ranks() -> None:
    evaluation = evaluate(FixedList(), hand_batches(), len(SCORES), k=[1, 3])
    sliced = slice_metrics(hand_spec(), evaluation.predictions.column("user_idx").to_numpy(), evaluation.ranks, [1, 3])
    assert sliced["torso"]["mrr"] == pytest.approx(1 / 2)
    assert sliced["tail"]["recall@3"] == 0 and sliced["tail"]["mrr"] == 0  # rank beyond the list: no credit


def test_an_empty_slice_or_a_short_history_is_refused() -> None:
    histories, targets = [np.zeros(n) for n in LENGTHS], np.arange(4)
    with pytest.raises(InputError, match=r"\['history 10\+'\] hold no user"):
        SliceSpec.build(COUNTS, histories[:3], targets[:3], [0.25, 0.75], [1, 5, 10])
    with pytest.raises(InputError, match="1 users have a history shorter than 2"):
        SliceSpec.build(COUNTS, histories, targets, [0.25, 0.75], [2, 5])
    assert hand_spec().members["new"].tolist() == [3]
    no_new = SliceSpec.build(COUNTS, histories[:3], targets[:3], [0.25, 0.75], [1, 5])  # new may be empty
    assert slice_metrics(no_new, np.arange(3), np.array([1.0, 2.0, 3.0]), [1])["new"] == {"users": 0}


def test_mmrec_test_slices_match_the_overall_metric_restricted_to_their_users(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mmrec(["test", "--config", "tests/conf/test.yaml", "--run_dir", str(tiny_run), "--model", "popularity",
                  "--slices", "true"]) == 0
    out = capsys.readouterr().out
    assert "history 10+" in out and "MRR" in out
    document = json.loads((tiny_run / "test" / "popularity-test" / "metrics.json").read_text())
    slices, n_users = document["slices"], document["n_users"]
    assert document["protocol"]["slices"]["shares"] == [0.25, 0.75]
    assert document["protocol"]["slices"]["history_buckets"] == [1, 5, 10]
    assert sum(slices[name]["users"] for name in ("head", "torso", "tail", "new")) == n_users
    assert sum(slices[name]["users"] for name in ("history 1-4", "history 5-9", "history 10+")) == n_users

    data = SequenceDataModule(run_dir=tiny_run, max_len=10_000, eval_batch_size=16)
    histories, targets = data.prepared.histories("test")
    spec = SliceSpec.build(data.prepared.train_item_counts, histories, targets)
    model = registry.load_recommender("popularity", tiny_run, None, torch.device("cpu"))
    for name, members in spec.members.items():
        if not len(members):
            continue
        loader = DataLoader(Subset(data.eval_dataset("test"), members.tolist()), batch_size=16, collate_fn=data.collate)
        alone = evaluate(model, loader, data.prepared.num_items, k=[5, 10, 20])
        assert slices[name] == pytest.approx({**alone.metrics, "users": len(members)}), name
    written = read_table(tiny_run / "test" / "popularity-test" / "slices.parquet", SLICE_MEMBERS).to_pandas()
    assert {name: sorted(group.user_idx) for name, group in written.groupby("slice")} == {
        name: members.tolist() for name, members in spec.members.items() if len(members)}


@pytest.mark.parametrize("option", [
    ["--slice_shares", "[0.75, 0.25]"],
    ["--slice_shares", "[0.001, 0.002]"],  # the torso holds no target
    ["--history_buckets", "[6, 9]"],  # shorter histories fall outside every bucket
])
def test_bad_slice_specifications_exit_2_without_artifact(
    tiny_run: Path, option: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["test", "--run_dir", str(tiny_run), "--model", "popularity", "--device", "cpu", "--slices", "true"]
    assert mmrec([*args, *option]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tiny_run / "test").exists()


def test_the_report_renders_the_slices(tiny_run: Path) -> None:
    pytest.importorskip("matplotlib")
    assert mmrec(["test", "--run_dir", str(tiny_run), "--model", "popularity", "--device", "cpu", "--slices", "true"]) == 0
    assert mmrec(["report", "--run_dir", str(tiny_run)]) == 0
    text = (tiny_run / "report.html").read_text()
    section = text[text.index('id="slices"'):text.index('id="sids"')]
    for expected in ("popularity-test", "<td>head</td>", "<td>new</td>", "history 5-9", "users"):
        assert expected in section, expected
