"""``mmrec compare``: known answers on hand-made test folders, the cross-check, every refusal, seed groups."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmrec.artifacts.schemas import PREDICTIONS, SLICE_MEMBERS, write_table
from mmrec.cli import main as mmrec
from mmrec.errors import InputError
from mmrec.evaluation.compare import compare
from mmrec.metrics.ranking import RankingMetrics

NUM_USERS = 200


def write_folder(
    path: Path, ranks: np.ndarray, split: str = "test", mask_history: bool = False, k: tuple[int, ...] = (5, 10, 20),
    items_sha256: str = "items-hash", users: np.ndarray | None = None, catalog_sha256: str | None = None,
    slices: dict[str, np.ndarray] | None = None,
) -> Path:
    """A test folder whose target sits at ``ranks[u]`` of user u's top-max(k) list (``inf``: not listed);
    with ``slices`` ({name: user_idx}), its ``slices.parquet`` too."""
    users = np.arange(len(ranks)) if users is None else users
    width = max(k)
    targets = users % 40
    item_lists = []
    for target, rank in zip(targets, ranks):
        listed = [1000 + j for j in range(width)]
        if rank <= width:
            listed[int(rank) - 1] = int(target)
        item_lists.append(listed)
    scores = [list(np.arange(width, 0, -1, dtype=np.float32))] * len(ranks)
    metric = RankingMetrics(k)
    metric.update(torch.tensor(ranks, dtype=torch.float64))
    document = {
        "dataset": {"items_sha256": items_sha256, "catalog_sha256": catalog_sha256,
                    "interactions_sha256": "interactions-hash"},
        "model": path.name, "split": split, "n_users": len(ranks),
        "protocol": {"leave_one_out": True, "full_ranking": True, "ranking": "score every item", "mrr_cutoff": None,
                     "mask_history": mask_history, "ties": "pessimistic", "k": sorted(k)},
        "metrics": {name: float(value) for name, value in metric.compute().items()},
    }
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(document))
    table = pa.table({"user_idx": users, "target": targets, "items": item_lists, "scores": scores})
    write_table(table, path / "predictions.parquet", PREDICTIONS)
    if slices is not None:
        members = {"user_idx": np.concatenate(list(slices.values())).astype(np.int32),
                   "slice": [name for name, users_of in slices.items() for _ in users_of]}
        write_table(pa.table(members), path / "slices.parquet", SLICE_MEMBERS)
    return path


def random_ranks(seed: int, hit_rate: float) -> np.ndarray:
    """Ranks 1..20 for a share ``hit_rate`` of the users, the others missing from the list."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(NUM_USERS) < hit_rate, rng.integers(1, 21, NUM_USERS), np.inf)


def test_identical_folders_differ_by_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ranks = random_ranks(0, 0.5)
    a, b = write_folder(tmp_path / "test" / "a-test", ranks), write_folder(tmp_path / "test" / "b-test", ranks)
    assert mmrec(["compare", str(a), str(b), "--bootstrap", "200"]) == 0
    result = json.loads((tmp_path / "test" / "compare-a-test-vs-b-test.json").read_text())
    assert result["k"] == 10 and result["n_users"] == NUM_USERS
    for statistics in result["comparisons"][0]["metrics"].values():
        assert statistics["difference"] == 0 and statistics["ci95"] == [0, 0]
        assert statistics["p_ttest"] == 1 and statistics["p_wilcoxon"] == 1
    assert "recall@10" in capsys.readouterr().out


def test_a_clearly_better_model_is_significant(tmp_path: Path) -> None:
    base = random_ranks(1, 0.3)
    better = np.where(np.isfinite(base), 1.0, np.where(np.arange(NUM_USERS) % 2 == 0, 3.0, np.inf))
    a, b = write_folder(tmp_path / "a", base), write_folder(tmp_path / "b", better)
    result = compare([a], [[b]], k=None, resamples=2000, seed=0)
    for name in ("recall@10", "ndcg@10"):
        statistics = result["comparisons"][0]["metrics"][name]
        assert statistics["difference"] > 0 and statistics["ci95"][0] > 0 and statistics["relative"] > 0
        assert statistics["p_ttest"] < 0.05 and statistics["p_wilcoxon"] < 0.05
    again = compare([a], [[b]], k=5, resamples=2000, seed=0)
    assert again["k"] == 5 and compare([a], [[b]], k=5, resamples=2000, seed=0) == again  # seeded: reproducible


def test_predictions_must_reproduce_their_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = write_folder(tmp_path / "a", random_ranks(0, 0.5)), write_folder(tmp_path / "b", random_ranks(1, 0.5))
    document = json.loads((b / "metrics.json").read_text())
    document["metrics"]["ndcg@10"] += 0.01
    (b / "metrics.json").write_text(json.dumps(document))
    assert mmrec(["compare", str(a), str(b), "--bootstrap", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(b) in err and "ndcg@10" in err and "metrics.json says" in err


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"split": "valid"}, "split"),
        ({"mask_history": True}, "protocol (mask_history)"),
        ({"k": (5, 10)}, "protocol (k)"),
        ({"items_sha256": "other-items"}, "dataset (items_sha256)"),
        ({"items_sha256": "other-items", "catalog_sha256": "catalog"}, "dataset (items_sha256)"),  # the first records none
        ({"users": np.arange(NUM_USERS) + 1}, "users"),
    ],
)
def test_incomparable_folders_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, what: str
) -> None:
    ranks = random_ranks(0, 0.5)
    a, b = write_folder(tmp_path / "a", ranks), write_folder(tmp_path / "b", ranks, **change)
    assert mmrec(["compare", str(a), str(b), "--bootstrap", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{a} and {b} differ in {what}:" in err


def test_items_tables_of_one_catalog_are_compared(tmp_path: Path) -> None:
    """A content ablation (refined item text): the items tables differ, the catalog does not; another catalog is refused."""
    plain = write_folder(tmp_path / "plain", random_ranks(0, 0.5), catalog_sha256="catalog")
    refined = write_folder(tmp_path / "refined", random_ranks(1, 0.5), items_sha256="refined", catalog_sha256="catalog")
    other = write_folder(tmp_path / "other", random_ranks(2, 0.5), items_sha256="other-items", catalog_sha256="other")
    result = compare([plain], [[refined]], resamples=10)
    assert result["dataset"] == {"items_sha256": "items-hash", "catalog_sha256": "catalog",
                                 "interactions_sha256": "interactions-hash"}
    with pytest.raises(InputError, match=r"differ in dataset \(items_sha256\)"):
        compare([plain], [[other]], resamples=10)


def test_bad_command_lines_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = write_folder(tmp_path / "a", random_ranks(0, 0.5)), write_folder(tmp_path / "b", random_ranks(1, 0.5))
    assert mmrec(["compare", str(a)]) == 2
    assert mmrec(["compare", str(a), str(b), "--k", "7"]) == 2
    assert mmrec(["compare", str(a), "--baseline", str(a), "--candidate", str(b)]) == 2
    assert mmrec(["compare", str(a), str(tmp_path / "missing")]) == 2
    messages = capsys.readouterr().err.splitlines()
    assert len(messages) == 4 and "--k 7 was not measured" in messages[1] and "not both" in messages[2]


def test_seed_groups_average_per_user_before_testing(tmp_path: Path) -> None:
    base = [write_folder(tmp_path / f"s{seed}" / "test" / "sasrec-test", random_ranks(seed, 0.3)) for seed in (1, 2)]
    cand = [write_folder(tmp_path / f"s{seed}" / "test" / "fusion-test", random_ranks(seed + 10, 0.6)) for seed in (1, 2)]
    output = tmp_path / "groups.json"
    assert mmrec(["compare", "--baseline", *map(str, base), "--candidate", *map(str, cand), "--bootstrap", "500",
                  "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    candidate = result["comparisons"][0]["candidate"]
    assert candidate["label"] == "fusion-test" and len(candidate["folders"]) == 2
    means = candidate["per_seed"]["recall@10"]
    assert candidate["mean"]["recall@10"] == pytest.approx(np.mean(means))
    assert candidate["std"]["recall@10"] == pytest.approx(np.std(means, ddof=1)) and candidate["std"]["recall@10"] > 0
    statistics = result["comparisons"][0]["metrics"]["recall@10"]
    assert statistics["difference"] == pytest.approx(candidate["mean"]["recall@10"] - result["baseline"]["mean"]["recall@10"])
    assert statistics["p_ttest"] < 0.05


def test_real_test_folders_pass_the_cross_check(tiny_run: Path) -> None:
    assert mmrec(["test", "--config", "tests/conf/test.yaml", "--run_dir", str(tiny_run), "--model", "popularity"]) == 0
    folder = tiny_run / "test" / "popularity-test"
    shutil.copytree(folder, tiny_run / "test" / "copy-test")
    result = compare([folder], [[tiny_run / "test" / "copy-test"]], k=20, resamples=100)
    assert result["n_users"] == 60 and result["comparisons"][0]["metrics"]["ndcg@20"]["p_wilcoxon"] == 1.0


TWO_SLICES = {"head": np.arange(0, 120), "tail": np.arange(120, NUM_USERS)}


def test_a_slice_is_compared_as_its_users_alone_would_be(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, better = random_ranks(1, 0.3), random_ranks(2, 0.6)
    write_folder(tmp_path / "all" / "a-test", base, slices=TWO_SLICES)
    write_folder(tmp_path / "all" / "b-test", better, slices=TWO_SLICES)
    tail = TWO_SLICES["tail"]
    write_folder(tmp_path / "tail" / "a-test", base[tail], users=tail)
    write_folder(tmp_path / "tail" / "b-test", better[tail], users=tail)
    assert mmrec(["compare", str(tmp_path / "all" / "a-test"), str(tmp_path / "all" / "b-test"), "--slices", "true",
                  "--bootstrap", "200"]) == 0
    assert "by slice: b-test against a-test" in capsys.readouterr().out
    sliced = json.loads(next((tmp_path / "all").glob("compare-*.json")).read_text())["comparisons"][0]["slices"]
    alone = compare([tmp_path / "tail" / "a-test"], [[tmp_path / "tail" / "b-test"]], resamples=200)
    assert sliced["tail"] == {"n_users": len(tail), "metrics": alone["comparisons"][0]["metrics"]}
    assert sliced["head"]["n_users"] == 120


def test_slices_must_be_there_and_alike(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ranks = random_ranks(1, 0.3)
    a = write_folder(tmp_path / "a-test", ranks, slices=TWO_SLICES)
    plain = write_folder(tmp_path / "plain-test", ranks)
    other = write_folder(tmp_path / "other-test", ranks, slices={"head": np.arange(0, 100), "tail": np.arange(100, NUM_USERS)})
    stray = write_folder(tmp_path / "stray-test", ranks, slices={"head": np.arange(0, 100), "tail": np.arange(100, NUM_USERS + 5)})
    for folder, expected in ((plain, "no slices.parquet"), (other, "slice the users differently")):
        assert mmrec(["compare", str(a), str(folder), "--slices", "true"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err
    assert mmrec(["compare", str(stray), str(stray), "--slices", "true"]) == 2
    assert "that predictions.parquet does not hold" in capsys.readouterr().err
    assert not list(tmp_path.glob("compare-*.json"))
    assert compare([a], [[plain]], resamples=10)["n_users"] == NUM_USERS  # without --slices nothing is read of them


def test_variants_of_one_model_are_labelled_by_the_folder_that_tells_them_apart(tmp_path: Path) -> None:
    """Plain against refined text, both tested as ``fusion-test`` over two seeds: the table, the JSON and the
    default file name name the variants, and a parent that only the seeds vary reads ``*``."""
    sides = {variant: [write_folder(tmp_path / variant / f"seed{seed}" / "test" / "fusion-test",
                                    random_ranks(seed + offset, 0.4)) for seed in (42, 43)]
             for variant, offset in (("plain", 0), ("refined", 10))}
    assert mmrec(["compare", "--baseline", *map(str, sides["plain"]), "--candidate", *map(str, sides["refined"]),
                  "--bootstrap", "200"]) == 0
    written = list((tmp_path / "plain" / "seed42" / "test").glob("compare-*.json"))
    assert [path.name for path in written] == ["compare-plain_test_fusion-test-vs-refined_test_fusion-test.json"]
    result = json.loads(written[0].read_text())
    assert result["baseline"]["label"] == "plain/*/test/fusion-test"
    assert result["comparisons"][0]["candidate"]["label"] == "refined/*/test/fusion-test"


def test_only_sides_that_share_a_name_are_lengthened(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_folder(tmp_path / "run" / "test" / "sasrec-test", random_ranks(0, 0.5))
    b = write_folder(tmp_path / "run" / "test" / "fusion-test", random_ranks(1, 0.5))
    c = write_folder(tmp_path / "other" / "test" / "fusion-test", random_ranks(2, 0.5))
    assert mmrec(["compare", str(a), str(b), "--bootstrap", "100"]) == 0
    assert "* sasrec-test" in capsys.readouterr().out
    result = compare([a], [[b], [c]], resamples=10)
    assert [result["baseline"]["label"], *(side["candidate"]["label"] for side in result["comparisons"])] == [
        "sasrec-test", "run/test/fusion-test", "other/test/fusion-test"]
