"""The evaluation loop: history masking, the top-k list path, the registry, and `mmrec test`'s outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmrec.artifacts import Manifest, read_table
from mmrec.artifacts.schemas import PREDICTIONS
from mmrec.cli import main as mmrec
from mmrec.data.prepared import PreparedData
from mmrec.errors import InputError
from mmrec.evaluation import registry
from mmrec.evaluation.evaluate import evaluate, seen_items
from mmrec.evaluation.report import catalog_sha256
from mmrec.models.popularity import Popularity

NUM_ITEMS = 6
# item scores shared by every user: 0 best, 5 worst
SCORES = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])


class FixedScores:
    """A Recommender giving every user the same scores."""

    def score_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return SCORES.expand(len(batch["target"]), -1)


class FixedList:
    """A TopKRecommender: the same ranked list for every user, at most ``length`` items, -1 padded."""

    def __init__(self, length: int = NUM_ITEMS) -> None:
        self.length = length
        self.asked: list[int] = []

    def topk_batch(self, batch: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.asked.append(k)
        order = SCORES.argsort(descending=True)[: min(k, self.length)]
        items = torch.full((len(batch["target"]), k), -1, dtype=torch.long)
        scores = torch.full((len(batch["target"]), k), -torch.inf)
        items[:, : len(order)], scores[:, : len(order)] = order, SCORES[order]
        return items, scores


def batches() -> list[dict[str, torch.Tensor]]:
    # user 0: history [0, 1] (left-padded), target 2; user 1: history [3], target 3 (a repeat)
    return [{
        "user_idx": torch.tensor([0, 1]),
        "history": torch.tensor([[0, 1], [0, 3]]),
        "mask": torch.tensor([[True, True], [False, True]]),
        "target": torch.tensor([2, 3]),
    }]


def test_seen_items_exclude_padding_and_the_target() -> None:
    seen = seen_items(batches()[0], NUM_ITEMS)
    assert seen.tolist() == [
        [True, True, False, False, False, False],
        [False, False, False, False, False, False],  # padding is not item 0; the repeated target stays rankable
    ]


def test_unmasked_and_masked_history() -> None:
    plain = evaluate(FixedScores(), batches(), NUM_ITEMS, k=[1, 3])
    assert plain.metrics["recall@1"] == 0.0
    assert plain.metrics["mrr"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    masked = evaluate(FixedScores(), batches(), NUM_ITEMS, k=[1, 3], mask_history=True)
    assert masked.metrics["recall@1"] == pytest.approx(1 / 2)  # user 0's items 0, 1 are removed: target 2 ranks first
    assert masked.metrics["mrr"] == pytest.approx((1 + 1 / 4) / 2)
    assert masked.predictions.column("items").to_pylist()[0] == [2, 3, 4]


def test_list_models_match_scoring_models_within_the_list() -> None:
    by_list = evaluate(FixedList(), batches(), NUM_ITEMS, k=[1, 3])
    by_scores = evaluate(FixedScores(), batches(), NUM_ITEMS, k=[1, 3])
    assert by_list.ranking == "top-k list" and by_scores.ranking == "scores"
    for name in ("recall@1", "recall@3", "ndcg@3"):
        assert by_list.metrics[name] == pytest.approx(by_scores.metrics[name])
    # the list holds max(k) = 3 items, so user 1's target (rank 4) is beyond it: no MRR credit
    assert by_list.metrics["mrr"] == pytest.approx((1 / 3) / 2)


def test_list_models_are_asked_for_extra_items_when_history_is_masked() -> None:
    model = FixedList()
    result = evaluate(model, batches(), NUM_ITEMS, k=[1, 3], mask_history=True)
    assert model.asked == [3 + 2]  # max(k) + history width
    assert result.metrics["recall@1"] == pytest.approx(1 / 2)
    assert result.predictions.column("items").to_pylist() == [[2, 3, 4], [0, 1, 2]]


def test_empty_list_slots_are_left_out_of_predictions() -> None:
    result = evaluate(FixedList(length=2), batches(), NUM_ITEMS, k=[3])
    assert result.predictions.column("items").to_pylist() == [[0, 1], [0, 1]]
    assert result.metrics["recall@3"] == 0.0 and result.metrics["mrr"] == 0.0


def test_scores_of_the_wrong_width_are_refused() -> None:
    with pytest.raises(InputError, match="another item table"):
        evaluate(FixedScores(), batches(), NUM_ITEMS + 1, k=[1])


def test_popularity_counts_training_interactions_only(tiny_run: Path) -> None:
    model = registry.load_recommender("popularity", tiny_run, None, torch.device("cpu"))
    assert isinstance(model, Popularity)
    table = PreparedData(tiny_run).interactions.to_pandas()
    expected = np.bincount(table.loc[table.split == "train", "item_idx"], minlength=40)
    assert model.counts.tolist() == expected.tolist()
    with pytest.raises(InputError, match="no checkpoint"):
        registry.load_recommender("popularity", tiny_run, "weights.ckpt", torch.device("cpu"))


def load_fixed(run_dir: Path, checkpoint: str | None, device: torch.device) -> FixedList:
    return FixedList()


def test_registering_a_model_is_one_line(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.MODELS, "fixed", "tests.test_evaluate:load_fixed")
    assert isinstance(registry.load_recommender("fixed", tiny_run, None, torch.device("cpu")), FixedList)
    with pytest.raises(InputError, match="unknown model 'nope'.*popularity"):
        registry.load_recommender("nope", tiny_run, None, torch.device("cpu"))


def test_mmrec_test_writes_metrics_and_predictions(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mmrec(["test", "--config", "tests/conf/test.yaml", "--run_dir", str(tiny_run), "--model", "popularity"]) == 0
    folder = tiny_run / "test" / "popularity-test"
    document = json.loads((folder / "metrics.json").read_text())
    assert document["model"] == "popularity" and document["split"] == "test" and document["n_users"] == 60
    assert document["protocol"] == {
        "leave_one_out": True, "full_ranking": True, "ranking": "score every item", "mrr_cutoff": None,
        "mask_history": False, "ties": "pessimistic", "k": [5, 10, 20],
    }
    prepare = Manifest.read(tiny_run / "prepare")
    assert document["dataset"]["items_sha256"] == prepare.lineage["items"]
    assert document["dataset"]["catalog_sha256"] == catalog_sha256(PreparedData(tiny_run).items)
    assert set(document["metrics"]) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr"}
    predictions = read_table(folder / "predictions.parquet", PREDICTIONS)
    assert predictions.num_rows == 60 and all(len(items) == 20 for items in predictions.column("items").to_pylist())
    assert Manifest.read(folder).lineage == prepare.lineage
    assert "popularity on test" in capsys.readouterr().out
    assert not any(p.name.startswith(".") for p in (tiny_run / "test").iterdir())  # no temporary folder left


def test_catalog_hash_follows_the_item_index_not_the_content() -> None:
    items = pa.table({"item_idx": [0, 1], "item_id": ["a", "b"], "text": ["x", "y"]})
    assert catalog_sha256(items) == catalog_sha256(items.set_column(2, "text", pa.array(["a rewrite", None])))
    assert catalog_sha256(items) != catalog_sha256(items.set_column(1, "item_id", pa.array(["b", "a"])))


def test_masked_results_go_to_their_own_folder(tiny_run: Path) -> None:
    args = ["test", "--run_dir", str(tiny_run), "--model", "popularity", "--split", "valid", "--device", "cpu"]
    assert mmrec(args) == 0 and mmrec([*args, "--mask_history", "true"]) == 0
    plain = json.loads((tiny_run / "test" / "popularity-valid" / "metrics.json").read_text())
    masked = json.loads((tiny_run / "test" / "popularity-valid-masked" / "metrics.json").read_text())
    assert not plain["protocol"]["mask_history"] and masked["protocol"]["mask_history"]
    assert masked["metrics"]["ndcg@10"] >= plain["metrics"]["ndcg@10"]
    assert math.isfinite(masked["metrics"]["mrr"])


def test_unknown_model_is_a_one_line_error(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mmrec(["test", "--run_dir", str(tiny_run), "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


class AutocastProbe(FixedScores):
    """Scores as FixedScores, and records whether each call ran under autocast and in which dtype."""

    def __init__(self) -> None:
        self.seen: list[torch.dtype | None] = []

    def score_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return super().score_batch(batch)


def test_autocast_is_applied_only_when_asked_and_recorded(tiny_run: Path) -> None:
    plain, bf16 = AutocastProbe(), AutocastProbe()
    evaluate(plain, batches(), NUM_ITEMS)
    evaluate(bf16, batches(), NUM_ITEMS, autocast_dtype=torch.bfloat16)
    assert set(plain.seen) == {None} and set(bf16.seen) == {torch.bfloat16}
    for precision, recorded in (("auto", "32"), ("bf16", "bf16")):  # auto: bf16 on a GPU only
        assert mmrec(["test", "--config", "tests/conf/test.yaml", "--run_dir", str(tiny_run), "--model", "popularity",
                      "--precision", precision]) == 0
        assert json.loads((tiny_run / "test" / "popularity-test" / "metrics.json").read_text())["precision"] == recorded
