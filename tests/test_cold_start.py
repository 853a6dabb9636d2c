"""Cold start in the fusion head (issue 16): never-seen items leave the training softmax, cold-start dropout
scores a random share of the other items by content alone, and on the new-item protocol the fusion head then
ranks new targets where SASRec cannot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from mmrec.cli import main as mmrec
from mmrec.errors import InputError
from mmrec.evaluation.slices import SliceSpec
from mmrec.models.llm.distill import distillation_loss
from mmrec.models.llm.fusion import FrequencyAwareFusion
from mmrec.stages.test import unrankable_targets

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf"


def fusion(counts: list[int], text_present: list[bool]) -> FrequencyAwareFusion:
    torch.manual_seed(0)
    n = len(counts)
    tables = {"collab": torch.randn(n, 4), "text": torch.randn(n, 3)}
    present = {"collab": torch.tensor(counts) > 0, "text": torch.tensor(text_present)}
    model = FrequencyAwareFusion(8, torch.tensor(counts), tables, present)
    torch.nn.init.normal_(model.weight_mlp[-1].weight)  # weights that differ per item
    return model


def test_items_scored_as_unseen_keep_only_their_content() -> None:
    model = fusion([5, 3, 0, 2], [True, True, True, False])
    as_unseen = torch.tensor([True, False, False, True])
    weights = model.weights(as_unseen)
    assert torch.allclose(weights.sum(-1), torch.ones(4))
    head, collab, text = (model.scorers.index(name) for name in ("head", "collab", "text"))
    assert weights[0, head] == 0 and weights[0, collab] == 0 and weights[0, text] == 1
    assert torch.equal(weights[1], model.weights()[1])  # not drawn: unchanged
    assert weights[2, text] == 1  # never seen: content alone either way
    assert torch.equal(weights[3], model.weights()[3])  # no content: keeps what it has rather than nothing


def test_the_training_softmax_leaves_never_seen_items_out() -> None:
    model = fusion([5, 0, 2, 0], [True] * 4)
    logits = model.seen_only(model(torch.randn(3, 8)))
    assert torch.isinf(logits[:, [1, 3]]).all() and torch.isfinite(logits[:, [0, 2]]).all()
    loss = F.cross_entropy(logits, torch.tensor([0, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_distillation_over_the_seen_items_is_the_kl_of_those_columns() -> None:
    torch.manual_seed(0)
    columns = torch.tensor([True, False, True, True, False])
    student = torch.randn(4, 5).masked_fill(~columns, float("-inf")).requires_grad_()
    teacher = torch.randn(4, 5)
    valid = torch.tensor([True, True, False, True])
    loss = distillation_loss(student, teacher, 2.0, valid, columns)
    loss.backward()
    kept = columns.nonzero().flatten()
    log_s, log_t = F.log_softmax(student[:, kept] / 2, -1), F.log_softmax(teacher[:, kept] / 2, -1)
    expected = 4 * (log_t.exp() * (log_t - log_s)).sum(-1)[valid].mean()
    assert torch.allclose(loss, expected) and torch.isfinite(student.grad).all()


@pytest.fixture(scope="module")
def new_item_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fixture under the new-item protocol (a quarter of the items new), with SASRec and SIDs."""
    run = tmp_path_factory.mktemp("new-items") / "run"
    assert mmrec(["prepare", "--config", str(CONF / "prepare.yaml"), "--run_dir", str(run), "--split.new_items", "0.25"]) == 0
    assert mmrec(["fit-collab", "--config", str(CONF / "fit-collab.yaml"), "--run_dir", str(run), "--trainer.max_steps", "40"]) == 0
    assert mmrec(["fit-quantizer", "--config", str(CONF / "fit-quantizer.yaml"), "--run_dir", str(run),
                  "--data.modalities", "[collab, image]"]) == 0
    assert mmrec(["assign-sids", "--config", str(CONF / "assign-sids.yaml"), "--run_dir", str(run)]) == 0
    return run


def sliced_test(run: Path, model: str) -> int:
    return mmrec(["test", "--config", str(CONF / "test.yaml"), "--run_dir", str(run), "--model", model,
                  "--slices", "true", "--history_buckets", "[1, 5]"])


def test_on_the_new_item_protocol_the_fusion_head_ranks_new_targets_that_sasrec_cannot(new_item_run: Path) -> None:
    assert mmrec(["fit-recommender", "--config", str(CONF / "fit-recommender.yaml"), "--config",
                  str(ROOT / "configs" / "cold-start" / "fit-recommender.yaml"), "--run_dir", str(new_item_run),
                  "--model.modalities", "[collab, image]", "--trainer.max_steps", "120"]) == 0
    new = {}
    for model in ("sasrec", "fusion"):
        assert sliced_test(new_item_run, model) == 0
        slices = json.loads((new_item_run / "test" / f"{model}-test" / "metrics.json").read_text())["slices"]
        new[model] = slices["new"]["ndcg@10"]
        assert slices["new"]["users"] > 0
    assert new["fusion"] > new["sasrec"]


def test_slices_of_a_model_that_cannot_rank_new_targets_are_refused(new_item_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The generative head writes collab SIDs, and a new item has none: its new slice would be 0 by construction."""
    assert mmrec(["fit-recommender", "--config", str(CONF / "fit-recommender-generative.yaml"), "--run_dir", str(new_item_run)]) == 0
    capsys.readouterr()
    assert sliced_test(new_item_run, "generative") == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "cannot rank" in errors[0] and "sid_modality" in errors[0] and "Traceback" not in err
    assert not (new_item_run / "test" / "generative-test").exists()
    assert mmrec(["test", "--config", str(CONF / "test.yaml"), "--run_dir", str(new_item_run), "--model", "generative"]) == 0


def test_a_head_on_content_sids_is_sliced_and_counts_the_targets_it_cannot_rank(
    new_item_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On image SIDs the generative head can write new items, so it is sliced; the fixture's items without an
    image have no image SID, and the test targets among them are counted (misses), slice by slice."""
    assert mmrec(["fit-recommender", "--config", str(CONF / "fit-recommender-generative.yaml"), "--run_dir",
                  str(new_item_run), "--model.init_args.sid_modality", "image"]) == 0
    capsys.readouterr()
    assert sliced_test(new_item_run, "generative") == 0
    document = json.loads((new_item_run / "test" / "generative-test" / "metrics.json").read_text())
    slices = document["slices"]
    with_sid = set(pq.read_table(new_item_run / "assign-sids" / "sids.parquet", filters=[("modality", "=", "image")])
                   .column("item_idx").to_pylist())
    targets = pq.read_table(new_item_run / "test" / "generative-test" / "predictions.parquet").column("target").to_pylist()
    blocked = sum(target not in with_sid for target in targets)
    assert blocked > 0 and sum(slices[name]["unrankable_targets"] for name in ("head", "torso", "tail", "new")) == blocked
    assert 0 < slices["new"]["users"] and slices["new"]["unrankable_targets"] < slices["new"]["users"]
    assert "targets the model can never rank, counted as misses" in capsys.readouterr().out


class PartialModel:
    """A model that can never rank the items of ``unrankable`` (as the generative head, items without an SID)."""

    def __init__(self, unrankable: list[int], num_items: int) -> None:
        self.mask = torch.zeros(num_items, dtype=torch.bool)
        self.mask[unrankable] = True

    def unrankable_items(self) -> torch.Tensor:
        return self.mask


def test_targets_a_model_cannot_rank_are_counted_per_slice_and_a_slice_of_nothing_else_is_refused() -> None:
    """A few unrankable targets (items without content) are misses, counted; a whole such slice is refused."""
    counts = np.array([50, 40, 30, 20, 10, 5, 3, 2, 1, 0])  # item 9 never occurs in training: new
    targets = np.array([0, 1, 5, 8, 9, 9])
    histories = [np.arange(length) for length in (1, 2, 3, 5, 6, 7)]
    spec = SliceSpec.build(counts, histories, targets, history_buckets=[1, 5])
    found = unrankable_targets(PartialModel([8], 10), "generative", "test", targets, spec)
    assert found is not None and found["new"] == 0 and found["tail"] == 1 and sum(found.values()) == 2  # tail, history 5+
    with pytest.raises(InputError, match="cannot rank any test target of slice new"):
        unrankable_targets(PartialModel([9], 10), "generative", "test", targets, spec)
    assert unrankable_targets(object(), "sasrec", "test", targets, spec) is None


@pytest.mark.parametrize("share", ["-0.1", "1.0"])
def test_a_cold_start_share_outside_0_1_is_one_line(tiny_run: Path, share: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = mmrec(["fit-recommender", "--config", str(CONF / "fit-recommender.yaml"), "--run_dir", str(tiny_run),
                  "--model.cold_start_dropout", share])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mmrec fit-recommender: error: ")]
    assert code == 2 and len(errors) == 1 and "model.cold_start_dropout" in errors[0] and "Traceback" not in err
    assert not (tiny_run / "fit-recommender").exists()
