"""`mmrec recommend`: table and JSON output, ad-hoc histories, batch Parquet, history exclusion, one-line
errors for unknown ids, and agreement with what `mmrec test` measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmrec.artifacts.schemas import PREDICTIONS, RECOMMENDATIONS, read_table
from mmrec.cli import main as mmrec
from mmrec.data.prepared import PreparedData
from tests.fixtures import make_prepared_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared tiny run with a SASRec trained two steps (the tests only read it)."""
    run = make_prepared_run(tmp_path_factory.mktemp("recommend") / "run")
    assert mmrec(["fit-collab", "--config", "tests/conf/fit-collab.yaml", "--run_dir", str(run)]) == 0
    return run


def recommend(run: Path, *args: str) -> int:
    return mmrec(["recommend", "--run_dir", str(run), "--device", "cpu", *args])


def as_json(run: Path, capsys: pytest.CaptureFixture[str], *args: str) -> list[dict]:
    capsys.readouterr()
    assert recommend(run, *args, "--format", "json") == 0
    return json.loads(capsys.readouterr().out)


def item_ids(run: Path, items: np.ndarray) -> list[str]:
    ids = PreparedData(run).items.column("item_id").to_pylist()
    return [ids[i] for i in items]


def test_json_and_table_output(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = as_json(run, capsys, "--model", "sasrec", "--user", "U3", "--k", "5")
    assert len(recs) == 5 and all(set(r) == {"item_id", "title", "score"} for r in recs)
    assert [r["score"] for r in recs] == sorted((r["score"] for r in recs), reverse=True)
    assert recommend(run, "--model", "sasrec", "--user", "U3", "--k", "5") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["rank", "item", "id"] and len(lines) == 6
    assert [line.split()[1] for line in lines[1:]] == [r["item_id"] for r in recs]
    assert recs[0]["title"] in lines[1] or recs[0]["title"] is None


def test_user_means_the_whole_history(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--user U recommends after every interaction of U (train, valid and test), as --history of them does."""
    sequence = item_ids(run, PreparedData(run).sequences[7])
    by_user = as_json(run, capsys, "--model", "sasrec", "--user", "U7", "--k", "10")
    by_history = as_json(run, capsys, "--model", "sasrec", "--history", " ".join(sequence), "--k", "10")
    shorter = as_json(run, capsys, "--model", "sasrec", "--history", " ".join(sequence[:-1]), "--k", "10")
    assert by_user == by_history and by_user != shorter


def test_exclude_history(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prepared = PreparedData(run)
    seen = set(item_ids(run, prepared.sequences[3]))
    kept = as_json(run, capsys, "--model", "popularity", "--user", "U3", "--k", "40", "--exclude_history", "false")
    dropped = as_json(run, capsys, "--model", "popularity", "--user", "U3", "--k", "40", "--exclude_history", "true")
    assert len(kept) == 40 and seen <= {r["item_id"] for r in kept}
    assert len(dropped) == 40 - len(seen) and not seen & {r["item_id"] for r in dropped}


def test_users_file_writes_one_parquet(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users.txt"
    users.write_text("U1\n\nU2\nU5\n")
    output = tmp_path / "out" / "recs.parquet"
    assert recommend(run, "--model", "sasrec", "--users", str(users), "--k", "4", "--output", str(output)) == 0
    table = read_table(output, RECOMMENDATIONS)
    assert table.column("user_id").to_pylist() == ["U1"] * 4 + ["U2"] * 4 + ["U5"] * 4
    assert table.column("rank").to_pylist() == [1, 2, 3, 4] * 3
    single = as_json(run, capsys, "--model", "sasrec", "--user", "U2", "--k", "4")
    assert table.column("item_id").to_pylist()[4:8] == [r["item_id"] for r in single]
    assert [p.name for p in output.parent.iterdir()] == ["recs.parquet"]  # no temporary file left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--history", "I0001 NOPE I0002 ALSO-NOT"], "2 unknown item id(s) in --history: NOPE, ALSO-NOT"),
        (["--user", "U999"], "1 unknown user id(s) in --user: U999"),
        (["--history", "   "], "--history is empty"),
        (["--user", "U1", "--history", "I0001"], "give exactly one of"),
    ],
)
def test_bad_ids_are_one_line_and_exit_2(run: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    capsys.readouterr()
    assert recommend(run, "--model", "popularity", *args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("mmrec recommend: error: ") and message in captured.err


def test_unknown_users_in_a_file_are_named(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users.txt"
    users.write_text("\n".join(["U1", *(f"X{i}" for i in range(8))]) + "\n")
    assert recommend(run, "--model", "popularity", "--users", str(users)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "8 unknown user id(s)" in err and "X0, X1, X2, X3, X4, ..." in err


def test_recommend_is_what_mmrec_test_measured(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After a user's train + valid items, unmasked, recommend's top-K is that user's test prediction."""
    assert mmrec(["test", "--config", "tests/conf/test.yaml", "--run_dir", str(run), "--model", "sasrec"]) == 0
    predictions = read_table(run / "test" / "sasrec-test" / "predictions.parquet", PREDICTIONS).to_pylist()
    histories, _ = PreparedData(run).histories("test")
    for user in (0, 11, 42):
        row = predictions[user]
        assert row["user_idx"] == user
        recs = as_json(run, capsys, "--model", "sasrec", "--history", " ".join(item_ids(run, histories[user])),
                       "--k", str(len(row["items"])), "--exclude_history", "false")
        assert [r["item_id"] for r in recs] == item_ids(run, row["items"])
        np.testing.assert_allclose([r["score"] for r in recs], row["scores"], rtol=1e-5, atol=1e-5)
