"""The new-item protocol of `mmrec prepare` (`split.new_items`): held out of training and validation, kept as
test targets and in the item table, recorded in the manifest, and measured by `mmrec test --slices true`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmrec.artifacts import Manifest
from mmrec.cli import main as mmrec
from mmrec.data.prepared import PreparedData
from mmrec.data.split import hold_out_new_items

CONF = Path(__file__).resolve().parent / "conf"


def test_new_items_are_kept_only_as_test_targets_and_short_users_go() -> None:
    users = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    items = np.array([0, 1, 2, 3, 1, 2, 0, 3, 3, 1])
    for seed in range(5):
        keep, new = hold_out_new_items(users, items, 4, 0.25, seed)
        assert len(new) == 1
        last = np.r_[users[1:] != users[:-1], True]
        expected = ~np.isin(items, new) | last
        expected &= np.bincount(users[expected], minlength=3)[users] >= 3
        assert keep.tolist() == expected.tolist()
    keep, new = hold_out_new_items(users, items, 4, 0.0, 0)
    assert keep.all() and len(new) == 0


def test_prepare_holds_new_items_out_and_records_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert mmrec(["prepare", "--config", str(CONF / "prepare.yaml"), "--run_dir", str(run), "--split.new_items", "0.1"]) == 0
    assert "kept out of training" in capsys.readouterr().out
    manifest = Manifest.read(run / "prepare")
    record = manifest.extra["split"]
    assert manifest.config["split"] == {"new_items": 0.1}
    new = record["new_item_idx"]
    prepared = PreparedData(run)
    assert record["new_item_count"] == len(new) == round(0.1 * prepared.num_items)
    table = prepared.interactions.to_pandas()
    on_new = table[table.item_idx.isin(new)]
    assert set(on_new.split) <= {"test"} and len(on_new) == record["new_test_targets"] > 0
    assert (prepared.train_item_counts[new] == 0).all()
    assert prepared.items.num_rows == prepared.num_items and set(new) <= set(prepared.items.column("item_idx").to_pylist())

    assert mmrec(["test", "--run_dir", str(run), "--model", "popularity", "--device", "cpu", "--slices", "true",
                  "--history_buckets", "[1, 5]"]) == 0
    slices = json.loads((run / "test" / "popularity-test" / "metrics.json").read_text())["slices"]
    assert slices["new"]["users"] == record["new_test_targets"]
    assert slices["new"]["recall@20"] == 0.0  # popularity cannot rank what training never showed


@pytest.mark.parametrize("share", ["-0.1", "1.0", "true"])
def test_a_share_outside_0_1_is_one_line_and_no_artifact(tmp_path: Path, share: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert mmrec(["prepare", "--config", str(CONF / "prepare.yaml"), "--run_dir", str(run), "--split.new_items", share]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "split.new_items" in err[0]
    assert not run.exists()
