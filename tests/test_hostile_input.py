"""Hostile input: malformed files and configurations never produce a traceback or a partial artifact.

Property tests (hypothesis, derandomized so that CI sees the same examples every run) feed sequence files,
CSV and Parquet tables, Amazon review files, precomputed embeddings and YAML configurations to
``mmrec prepare`` through the dispatcher, and damaged run folders to the loaders. Inputs are mostly
*nearly* valid, with damage mixed in, so that the checks deep inside (filtering, numbering, writing) run
as well as the ones at the door. The contract checked every time:

- ``mmrec prepare`` either succeeds, and its folder then loads and verifies, or exits non-zero with one
  line ``mmrec prepare: error: ...`` on stderr, no traceback, the previous ``prepare/`` folder untouched
  (or still none), and no temporary folder left behind;
- the loaders (``read_table``, ``Manifest.read``, ``PreparedData``, ``load_modality``,
  ``load_precomputed``) either return or raise :class:`mmrec.errors.MMRecError`; any other exception
  fails the test.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmrec.artifacts import Manifest, read_table
from mmrec.artifacts.manifest import MANIFEST, file_sha256
from mmrec.artifacts.schemas import INTERACTIONS, ITEMS, USERS
from mmrec.cli import main
from mmrec.data.precomputed import align, load_precomputed
from mmrec.data.prepared import PreparedData, load_modality
from mmrec.errors import MMRecError
from tests.fixtures import make_prepared_run

HOSTILE = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
"""Small and fixed: the file runs in about half a minute on two shared cores, with the same examples every
time. Finding new bugs is a job for a longer run with ``max_examples`` raised and ``derandomize`` off."""

GOOD_SEQUENCES = "u1 i1 i2 i3 i4\nu2 i2 i3 i5\nu3 i1 i3 i2 i6 i4\n"
GOOD_ITEMS = (
    "item,title,brand,price\ni1,Rose Lipstick,Velvet,9.5\ni2,,Velvet,3\ni3,Argan Shampoo,,12\n"
    "i4,Matte Foundation,Luna,20\ni5,Lip Balm,Luna,4\ni6,Night Cream,Pure,30\n"
)
T = TypeVar("T")


def rarely(usual: st.SearchStrategy[T], odd: st.SearchStrategy[T], one_in: int = 8) -> st.SearchStrategy[T]:
    """``odd`` about once in ``one_in`` draws, else ``usual``: damage frequent enough to be tested, rare
    enough that an example usually survives to the deeper steps."""
    return st.sampled_from([False] * (one_in - 1) + [True]).flatmap(lambda pick_odd: odd if pick_odd else usual)


# -- running prepare and checking the contract ---------------------------------------------------------------


def prepare(*argv: str) -> tuple[int, str, str]:
    """``mmrec prepare ARGV`` through the dispatcher; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["prepare", *argv])
    return code, out.getvalue(), err.getvalue()


def folder_state(folder: Path) -> dict[str, str] | None:
    """File name -> content hash of a stage folder, or None when there is none."""
    if not folder.exists():
        return None
    return {path.name: file_sha256(path) for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete ``prepare/`` folder, copied into examples that check a failure leaves it untouched."""
    raw = tmp_path_factory.mktemp("previous")
    (raw / "seq.txt").write_text(GOOD_SEQUENCES)
    (raw / "items.csv").write_text(GOOD_ITEMS)
    run_dir = raw / "run"
    code, _, err = prepare("--source", "SeqTxt", "--source.sequences", str(raw / "seq.txt"), "--source.items",
                           str(raw / "items.csv"), "--run_dir", str(run_dir), "--text.enabled", "false")
    assert code == 0, err
    return run_dir


@contextmanager
def scratch(previous: Path | None) -> Iterator[tuple[Path, Path]]:
    """A fresh (raw folder, run directory) pair; the run directory holds a copy of ``previous`` if given."""
    with tempfile.TemporaryDirectory() as tmp:
        raw, run_dir = Path(tmp) / "raw", Path(tmp) / "run"
        raw.mkdir()
        if previous is not None:
            shutil.copytree(previous, run_dir)
        yield raw, run_dir


def check_contract(run_dir: Path, argv: list[str]) -> None:
    """Run prepare and check: success with a loadable folder, or one error line and nothing changed."""
    before = folder_state(run_dir / "prepare")
    code, _, err = prepare(*argv, "--run_dir", str(run_dir))
    assert "Traceback" not in err, err
    if run_dir.exists():
        assert not [path.name for path in run_dir.glob(".prepare.*")]
    if code == 0:
        data = PreparedData(run_dir)
        for name in data.manifest.outputs:
            data.manifest.verify_output(data.folder, name)
        assert all(len(sequence) >= 3 for sequence in data.sequences)
        assert data.num_items == int(data.interactions.column("item_idx").to_numpy().max()) + 1
        return
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmrec prepare: error: "), err
    assert folder_state(run_dir / "prepare") == before


def write_bytes(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return path


def options(values: dict[str, str]) -> list[str]:
    return [part for option, value in values.items() for part in (option, value)]


# -- strategies: text files ----------------------------------------------------------------------------------

ODD_TOKENS = st.sampled_from(["é", "用户", "\u200b", "-1", "ü\u0301", "a\x00b", "NaN", "#", '"', "\ufeffu9", "0042"])
JUNK = st.one_of(
    st.binary(max_size=120),
    st.just(b""),
    st.just(b"\xff\xfe\x00\x00garbage"),
    st.just(b"PAR1\x00\x00PAR1"),
    st.just(b"\x1f\x8b\x08\x00truncated gzip"),
    st.just(b"PK\x03\x04truncated zip"),
)
ITEM_IDS = rarely(st.sampled_from(["i1", "i2", "i3", "i4", "i5", "i6"]), st.one_of(st.just("i9"), ODD_TOKENS))


@st.composite
def sequence_files(draw: st.DrawFn) -> str:
    """``user item item ...`` lines, mostly well formed, with short lines, repeated users and odd tokens."""
    lines = []
    for user in range(draw(st.integers(0, 6))):
        name = draw(rarely(st.just(f"u{user}"), st.one_of(st.just("u0"), ODD_TOKENS)))
        items = draw(st.lists(ITEM_IDS, min_size=draw(rarely(st.just(3), st.integers(0, 2))), max_size=7))
        lines.append(draw(st.sampled_from([" ", "\t", "  "])).join([name, *items]))
        lines.extend(draw(rarely(st.just([]), st.lists(st.one_of(st.just(""), st.text(max_size=8)), max_size=1))))
    return draw(st.sampled_from(["\n", "\n", "\r\n", "\r"])).join(lines)


CELLS = rarely(
    st.sampled_from(["Rose Lipstick", "Lip Balm", "Velvet", "9.5", "12", ""]),
    st.sampled_from(['"quoted, with comma"', '"unterminated', 'a""b', "multi\nline", '"x\ny"', "-3", "1e400", "NaN",
                     "NA", "null", "用户", "\x00", ";", "\t", "é"]),
    one_in=4,
)
HEADERS = rarely(
    st.sampled_from([["item", "title", "brand", "price"], ["item", "title"]]),
    st.sampled_from([["title", "item"], ["item", "item", "title"], ["id"], ["item"], [], ["", "title"],
                     ["item", "title", "img"]]),
)
READ_OPTIONS = rarely(
    st.just("null"),
    st.sampled_from(['{"sep": ";"}', '{"encoding": "no-such-codec"}', '{"bogus": 1}', '{"compression": "gzip"}',
                     '{"header": null}', '{"quotechar": ""}', '{"nrows": -1}', '{"usecols": [7]}',
                     '{"dtype": "int64"}', '{"engine": "python"}']),
    one_in=4,
)
TEMPLATES = rarely(
    st.sampled_from(["null", "{title}", "{brand}: {title}"]),
    st.sampled_from(["{price:.2f}", "{title!x}", "{nope}", "{", "{0}", "{title:>{brand}}", "{title[0]}", "{brand!r:d}"]),
    one_in=4,
)
STAMPS = rarely(
    st.integers(-10, 10**12).map(str),
    st.sampled_from(["1.5", "99999999999999999999", "-99999999999999999999", "9223372036854775807", "1e308", "inf",
                     "-inf", "nan", "", "2014-01-01", "2014-13-45", "yesterday", "0x10", "1_000", "True", "١٢٣"]),
    one_in=4,
)


def csv_text(header: list[str], rows: list[list[str]], sep: str) -> str:
    return "\n".join([sep.join(header), *(sep.join(row) for row in rows)]) + "\n"


# -- strategies: Parquet and NPZ ----------------------------------------------------------------------------

ARROW_VALUES = {
    "int64": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "int8": (pa.int8(), st.integers(-128, 127)),
    "uint64": (pa.uint64(), st.integers(0, 2**64 - 1)),
    "float64": (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)),
    "string": (pa.string(), st.text(max_size=5)),
    "bool": (pa.bool_(), st.booleans()),
    "binary": (pa.binary(), st.binary(max_size=5)),
    "list_float": (pa.list_(pa.float32()), st.lists(st.floats(width=32), max_size=3)),
    "list_string": (pa.list_(pa.string()), st.lists(st.text(max_size=3), max_size=3)),
    "timestamp": (pa.timestamp("us"), st.integers(-(2**50), 2**50)),
    "timestamp_tz": (pa.timestamp("s", tz="Europe/Paris"), st.integers(-(2**40), 2**40)),
    "null": (pa.null(), st.none()),
}


@st.composite
def arrow_columns(draw: st.DrawFn, rows: int, usual: dict[str, tuple[pa.DataType, st.SearchStrategy[Any]]]) -> dict:
    """Columns named as ``usual`` expects, mostly of the usual type; sometimes of another type or missing,
    sometimes with nulls, sometimes with a stranger column added."""
    arrays = {}
    for name, (kind, values) in usual.items():
        if draw(rarely(st.just(False), st.just(True))):
            continue
        odd = draw(rarely(st.just(False), st.just(True), one_in=4))
        kind, values = ARROW_VALUES[draw(st.sampled_from(sorted(ARROW_VALUES)))] if odd else (kind, values)
        cells = rarely(values, st.none(), one_in=10)
        arrays[name] = pa.array(draw(st.lists(cells, min_size=rows, max_size=rows)), type=kind)
    if draw(rarely(st.just(False), st.just(True))):
        arrays["other"] = pa.array([None] * rows, pa.null())
    return arrays


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` as it is, truncated, with one byte flipped, or replaced by junk."""
    damage = draw(rarely(st.just("none"), st.sampled_from(["truncate", "flip", "junk"]), one_in=4))
    if damage == "truncate":
        return data[: int(len(data) * draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.99])))]
    if damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    return draw(JUNK) if damage == "junk" else data


@st.composite
def parquet_files(draw: st.DrawFn, usual: dict[str, tuple[pa.DataType, st.SearchStrategy[Any]]]) -> bytes:
    rows = draw(rarely(st.integers(6, 12), st.integers(0, 5)))
    arrays = draw(arrow_columns(rows, usual)) or {"other": pa.array([None] * rows, pa.null())}
    return draw(damaged(parquet_bytes(pa.table(arrays))))


LOG_COLUMNS = {
    "user_id": (pa.string(), st.sampled_from(["u1", "u2"])),
    "item_id": (pa.string(), st.sampled_from(["i1", "i2", "i3", "i4"])),
    "timestamp": (pa.int64(), st.integers(0, 10**10)),
}
ITEM_COLUMNS = {
    "item_id": (pa.string(), st.sampled_from(["i1", "i2", "i3", "i4", "i9"])),
    "title": (pa.string(), st.text(max_size=6)),
    "image": (pa.string(), st.sampled_from(["a.jpg", "", "http://x.invalid/a.png"])),
}
EMBEDDING_COLUMNS = {
    "item_id": (pa.string(), st.sampled_from(["i1", "i2", "i3", "i4", "i5", "i6", "i9"])),
    "embedding": (pa.list_(pa.float32()), rarely(st.lists(st.floats(-1, 1, width=32), min_size=3, max_size=3),
                                                 st.lists(st.floats(width=32), max_size=4))),
}
NPZ_ARRAYS = {
    "item_id": rarely(st.just(np.array(["i1", "i2", "i3"])), st.sampled_from(
        [np.array([1, 2, 3]), np.array("i1"), np.array([["i1"], ["i2"]]), np.array(["a", "b", "c"], dtype=object),
         np.array(["i1", "i1", "i2"]), np.array([])])),
    "embedding": rarely(st.just(np.zeros((3, 4), np.float32)), st.sampled_from(
        [np.zeros((3, 0)), np.zeros((2, 4)), np.array([[1.0, np.nan]] * 3), np.array([[1 + 2j, 0]] * 3),
         np.array([["x", "y"]] * 3), np.zeros((3, 2, 2)), np.full((3, 2), 1e39), np.array([[True]] * 3)])),
}


@st.composite
def npz_files(draw: st.DrawFn) -> bytes:
    arrays = {name: draw(values) for name, values in NPZ_ARRAYS.items() if draw(rarely(st.just(True), st.just(False)))}
    sink = io.BytesIO()
    np.savez(sink, **arrays)
    return draw(damaged(sink.getvalue()))


# -- prepare on hostile sources --------------------------------------------------------------------------------


@HOSTILE
@given(
    content=rarely(sequence_files(), st.one_of(JUNK, st.text(max_size=40))),
    with_items=st.booleans(),
    with_previous=st.booleans(),
    filters=st.fixed_dictionaries({
        "--filters.user_core": rarely(st.sampled_from(["0", "2", "3"]), st.sampled_from(["-1", "99"])),
        "--filters.item_core": rarely(st.sampled_from(["0", "2"]), st.just("99")),
        "--filters.max_history": rarely(st.sampled_from(["null", "3", "5"]), st.sampled_from(["2", "-1", "0"])),
        "--filters.unknown_items": rarely(st.just("drop"), st.just("fail"), one_in=4),
    }),
)
def test_sequence_files(content: str | bytes, with_items: bool, with_previous: bool, filters: dict[str, str],
                        previous_run: Path) -> None:
    with scratch(previous_run if with_previous else None) as (raw, run_dir):
        argv = ["--source", "SeqTxt", "--source.sequences", str(write_bytes(raw / "seq.txt", content))]
        if with_items:
            argv += ["--source.items", str(write_bytes(raw / "items.csv", GOOD_ITEMS))]
        check_contract(run_dir, [*argv, *options(filters), "--text.enabled", "false"])


@HOSTILE
@given(
    header=HEADERS,
    cells=st.lists(st.lists(CELLS, min_size=3, max_size=3), min_size=6, max_size=6),
    widths=st.lists(rarely(st.none(), st.integers(0, 4)), min_size=6, max_size=6),
    extra=rarely(st.just([]), st.lists(st.tuples(st.sampled_from(["i1", "i9", "", '"i2"', "i3 "]),
                                                 st.lists(CELLS, max_size=4)), min_size=1, max_size=2)),
    sep=rarely(st.just(","), st.sampled_from(["\t", ";"])),
    suffix=rarely(st.just(".csv"), st.sampled_from([".tsv", ".parquet", ".txt"])),
    junk=rarely(st.none(), JUNK, one_in=10),
    settings_=st.fixed_dictionaries({
        "--source.item_id_column": rarely(st.just("null"), st.sampled_from(["item", "nope", "title"])),
        "--source.text_columns": rarely(st.sampled_from(["null", "[title]"]), st.sampled_from(["[nope]", "[]", "[item, item]"])),
        "--source.image_column": rarely(st.just("null"), st.sampled_from(["title", "nope"])),
        "--text.template": TEMPLATES,
        "--source.read_options": READ_OPTIONS,
    }),
)
def test_items_tables(header: list[str], cells: list[list[str]], widths: list[int | None],
                      extra: list[tuple[str, list[str]]], sep: str, suffix: str, junk: bytes | None,
                      settings_: dict[str, str], previous_run: Path) -> None:
    """Every sequence item has a row (so that success is possible), with odd cells, rows and options."""
    with scratch(previous_run) as (raw, run_dir):
        width = max(0, len(header) - 1)
        rows = [[f"i{n + 1}", *row[: width if w is None else w]] for n, (row, w) in enumerate(zip(cells, widths))]
        rows += [[item, *row] for item, row in extra]
        items = write_bytes(raw / f"items{suffix}", junk if junk is not None else csv_text(header, rows, sep))
        argv = ["--source", "SeqTxt", "--source.sequences", str(write_bytes(raw / "seq.txt", GOOD_SEQUENCES)),
                "--source.items", str(items)]
        check_contract(run_dir, [*argv, *options(settings_), "--text.enabled", "false"])


@HOSTILE
@given(
    rows=st.lists(st.tuples(rarely(st.sampled_from(["u1", "u2"]), st.sampled_from(["", "用户", "u1 ", '"u1"'])),
                            rarely(st.sampled_from(["i1", "i2", "i3"]), st.sampled_from(["", "i1,i2", "ï"])),
                            STAMPS), min_size=3, max_size=12),
    header=rarely(st.just(["user_id", "item_id", "timestamp"]),
                  st.sampled_from([["user_id", "item_id"], ["item_id", "user_id", "ts"]])),
    timestamp_column=rarely(st.sampled_from(["timestamp", "null"]), st.sampled_from(["ts", "user_id"])),
    with_previous=st.booleans(),
)
def test_interaction_logs(rows: list[tuple[str, str, str]], header: list[str], timestamp_column: str,
                          with_previous: bool, previous_run: Path) -> None:
    with scratch(previous_run if with_previous else None) as (raw, run_dir):
        log = write_bytes(raw / "log.csv", csv_text(header, [list(row)[: len(header)] for row in rows], ","))
        argv = ["--source", "Interactions", "--source.path", str(log), "--source.timestamp_column", timestamp_column]
        check_contract(run_dir, [*argv, "--text.enabled", "false"])


@HOSTILE
@given(
    log=parquet_files(LOG_COLUMNS),
    items=st.one_of(st.none(), parquet_files(ITEM_COLUMNS)),
    with_previous=st.booleans(),
)
def test_parquet_sources(log: bytes, items: bytes | None, with_previous: bool, previous_run: Path) -> None:
    with scratch(previous_run if with_previous else None) as (raw, run_dir):
        argv = ["--source", "Interactions", "--source.path", str(write_bytes(raw / "log.parquet", log))]
        if items is not None:
            argv += ["--source.items", str(write_bytes(raw / "items.parquet", items)), "--source.image_column", "image"]
        check_contract(run_dir, [*argv, "--text.enabled", "false"])


@HOSTILE
@given(
    content=st.one_of(parquet_files(EMBEDDING_COLUMNS), npz_files()),
    suffix=rarely(st.sampled_from([".parquet", ".npz"]), st.just(".npy")),
    dim=rarely(st.just("null"), st.sampled_from(["0", "-1", "4"])),
)
def test_precomputed_embeddings(content: bytes, suffix: str, dim: str, previous_run: Path) -> None:
    with scratch(previous_run) as (raw, run_dir):
        path = write_bytes(raw / f"emb{suffix}", content)
        try:
            align(load_precomputed(path), ["i1", "i2", "i3"], str(path))
        except MMRecError:
            pass
        argv = ["--source", "SeqTxt", "--source.sequences", str(write_bytes(raw / "seq.txt", GOOD_SEQUENCES)),
                "--image.precomputed", str(path), "--image.dim", dim, "--text.enabled", "false"]
        check_contract(run_dir, argv)


REVIEWS = st.fixed_dictionaries({
    "reviewerID": rarely(st.sampled_from(["A", "B"]), st.sampled_from(["", None, 5, [1]]), one_in=16),
    "asin": rarely(st.sampled_from(["B1", "B2", "B3"]), st.sampled_from([None, "", "B9"]), one_in=16),
    "unixReviewTime": rarely(st.integers(0, 10**9), st.sampled_from([-1, 2**70, "12", "x", None, 1.5, True, float("inf")]),
                             one_in=16),
}).map(json.dumps)
META = rarely(
    st.sampled_from(["{'asin': 'B1', 'title': 'Ball'}", "{'asin': 'B2', 'title': 'Kite', 'categories': [['Toys']]}",
                     '{"asin": "B3", "title": "Yo-yo"}']),
    st.sampled_from(["{'asin': 'B1', 'title': " + "[" * 400 + "]" * 400 + "}", "{'asin': 'B2', 'title': 10**10**10}",
                     "{'asin': 'B2'", "['asin', 'B1']", '{"asin": "B1", "categories": [[1, null], "x", {}]}',
                     "{'asin': 'B3', 'price': 1" + "0" * 5000 + "}", "\x00"]),
)


@HOSTILE
@given(
    meta=st.lists(META, min_size=2, max_size=4),
    reviews=st.lists(rarely(REVIEWS, st.text(max_size=20), one_in=12), min_size=3, max_size=10),
    gzip_reviews=st.booleans(),
    truncate=rarely(st.just(False), st.just(True)),
)
def test_amazon_files(meta: list[str], reviews: list[str], gzip_reviews: bool, truncate: bool, previous_run: Path) -> None:
    with scratch(previous_run) as (raw, run_dir):
        text = "\n".join(reviews).encode("utf-8", "surrogatepass")
        data = gzip.compress(text) if gzip_reviews else text
        path = write_bytes(raw / ("reviews.json.gz" if gzip_reviews else "reviews.json"), data[: len(data) // 2] if truncate else data)
        argv = ["--source", "Amazon2014", "--source.reviews", str(path),
                "--source.meta", str(write_bytes(raw / "meta.json", "\n".join(meta))), "--source.text_columns", "[title]",
                "--source.image_column", "null", "--text.enabled", "false"]
        check_contract(run_dir, argv)


@HOSTILE
@given(values=st.dictionaries(
    st.sampled_from(["num_users", "num_items", "num_categories", "min_length", "max_length", "popularity_skew",
                     "missing_text", "image_dim", "missing_image"]),
    st.one_of(st.integers(-2, 30).map(str), st.sampled_from(["1e308", "-1e308", "0.5", "nan", "inf", "x", "null", "[]"])),
    max_size=3))
def test_synthetic_options(values: dict[str, str], previous_run: Path) -> None:
    with scratch(previous_run) as (_, run_dir):
        argv = ["--source", "Synthetic", "--source.num_users", "20", "--source.num_items", "30",
                "--source.num_categories", "3", "--source.max_length", "8"]
        argv += [f"--source.{name}={value}" for name, value in values.items()]
        check_contract(run_dir, [*argv, "--text.enabled", "false"])


# -- hostile configurations ------------------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["", "x", "SeqTxt", "Synthetic", "Interactions", "Amazon2014", "NoSuchSource",
                                     "mmrec.data.sources.SeqTxt", "builtins.dict", "~/nope", "a\x00b", "{", "[1, 2"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(st.sampled_from(["a", "class_path"]), SCALARS,
                                                                           max_size=2))
MUTABLE_KEYS = [
    ("source",), ("source", "class_path"), ("source", "init_args"), ("source", "init_args", "sequences"),
    ("source", "init_args", "items"), ("source", "init_args", "text_columns"), ("source", "init_args", "bogus"),
    ("seed",), ("filters",), ("filters", "user_core"), ("filters", "max_history"), ("filters", "bogus"), ("text",),
    ("text", "enabled"), ("text", "template"), ("text", "batch_size"), ("image",), ("image", "precomputed"),
    ("image", "dim"), ("image", "batch_size"), ("bogus",), ("config",), ("run_dir",),
]


def valid_config(raw: Path) -> dict[str, Any]:
    return {
        "source": {"class_path": "SeqTxt", "init_args": {"sequences": str(raw / "seq.txt"),
                                                         "items": str(raw / "items.csv"), "text_columns": ["title"]}},
        "seed": 3,
        "filters": {"user_core": 0, "max_history": 5},
        "text": {"enabled": False, "template": "{title}"},
        "image": None,
    }


def mutate(config: dict[str, Any], key: tuple[str, ...], value: Any, delete: bool) -> None:
    """Set (or delete) ``key`` in a nested config, replacing whatever non-dict stands in the way."""
    node = config
    for part in key[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if delete:
        node.pop(key[-1], None)
    else:
        node[key[-1]] = value


@HOSTILE
@given(
    mutations=st.lists(st.tuples(st.sampled_from(MUTABLE_KEYS), VALUES, st.booleans()), max_size=3),
    other=rarely(st.none(), st.one_of(VALUES, st.lists(VALUES, max_size=2)), one_in=5),
    junk=rarely(st.none(), JUNK, one_in=6),
)
def test_yaml_configurations(mutations: list[tuple[tuple[str, ...], Any, bool]], other: Any, junk: bytes | None,
                             previous_run: Path) -> None:
    """A valid configuration with wrong types, unknown keys and missing fields; or an arbitrary value; or junk."""
    with scratch(previous_run) as (raw, run_dir):
        write_bytes(raw / "seq.txt", GOOD_SEQUENCES)
        write_bytes(raw / "items.csv", GOOD_ITEMS)
        path = raw / "prepare.yaml"
        if junk is not None:
            write_bytes(path, junk)
        else:
            config = valid_config(raw) if other is None else other
            for key, value, delete in mutations if isinstance(config, dict) else []:
                mutate(config, key, value, delete)
            path.write_text(yaml.safe_dump(config, allow_unicode=True))
        check_contract(run_dir, ["--config", str(path), "--text.enabled", "false"])


# -- loaders on damaged run folders ----------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 2**70), st.text(max_size=5),
              st.sampled_from(["../../x", "/etc/hostname", "items.parquet"])),
    lambda inner: st.one_of(st.lists(inner, max_size=2),
                            st.dictionaries(st.sampled_from(["file", "sha256", "rows", "items", "a"]), inner, max_size=2)),
    max_leaves=6,
)
MANIFEST_KEYS = ["stage", "config", "seed", "inputs", "outputs", "lineage", "extra", "schema_version", "python", "bogus"]


@st.composite
def mmrec_tables(draw: st.DrawFn) -> tuple[str, pa.Table]:
    """A table claiming to be an mmrec table (its metadata), with the right names but wrong contents or types."""
    name, schema = draw(st.sampled_from([("items", ITEMS), ("users", USERS), ("interactions", INTERACTIONS)]))
    rows = draw(st.integers(0, 8))
    arrays = {}
    for field in schema:
        if pa.types.is_integer(field.type):
            values = st.one_of(st.integers(0, 5), st.integers(-3, 2**31 - 1), st.none())
        elif field.name == "split":
            values = st.sampled_from(["train", "valid", "test", "x", None])
        else:
            values = st.one_of(st.text(max_size=3), st.none())
        arrays[field.name] = pa.array(draw(st.lists(rarely(values, st.none(), one_in=10), min_size=rows, max_size=rows)),
                                      field.type)
        if draw(rarely(st.just(False), st.just(True))):
            kind, odd = ARROW_VALUES[draw(st.sampled_from(sorted(ARROW_VALUES)))]
            arrays[field.name] = pa.array(draw(st.lists(odd, min_size=rows, max_size=rows)), kind)
    return name, pa.table(arrays).replace_schema_metadata(schema.metadata)


@st.composite
def embedding_tables(draw: st.DrawFn) -> tuple[str, pa.Table]:
    """An mmrec embeddings table with hostile columns: wrong types, nulls, ragged, non-finite, bad indices."""
    rows = draw(st.integers(0, 6))
    idx = draw(st.lists(rarely(st.integers(0, 4), st.one_of(st.none(), st.integers(-1, 6))), min_size=rows, max_size=rows))
    present = draw(st.lists(rarely(st.booleans(), st.none()), min_size=rows, max_size=rows))
    vector = rarely(st.lists(st.floats(-1, 1, width=32), min_size=2, max_size=2), st.none())
    vectors = draw(st.lists(vector, min_size=rows, max_size=rows))
    kind = draw(rarely(st.just(pa.list_(pa.float32(), 2)), st.sampled_from([pa.list_(pa.float32()), pa.list_(pa.string()),
                                                                            pa.list_(pa.float64(), 2)])))
    if kind == pa.list_(pa.string()):
        vectors = [None if v is None else [str(x) for x in v] for v in vectors]
    index_type = draw(rarely(st.just(pa.int32()), st.sampled_from([pa.int64(), pa.float64()])))
    table = pa.table({"item_idx": pa.array(idx, index_type), "present": pa.array(present, pa.bool_()),
                      "embedding": pa.array(vectors, kind)})
    return "emb_text", table.replace_schema_metadata({b"mmrec.schema": b"embeddings/1"})


def resign(folder: Path, name: str) -> None:
    """Record ``name``'s current bytes in the manifest (and lineage), so that checks past the hash run."""
    path = folder / MANIFEST
    data = json.loads(path.read_text())
    entry = data["outputs"][name]
    entry["sha256"] = file_sha256(folder / entry["file"])
    if name in ("items", "interactions"):
        data["lineage"][name] = entry["sha256"]
    path.write_text(json.dumps(data))


def exercise_loaders(run_dir: Path) -> None:
    """Every loader a later stage uses; each must return or raise MMRecError."""
    folder = run_dir / "prepare"
    calls = [
        lambda: Manifest.read(folder),
        lambda: read_table(folder / "items.parquet", ITEMS),
        lambda: read_table(folder / "users.parquet", USERS),
        lambda: read_table(folder / "interactions.parquet", INTERACTIONS),
        lambda: load_modality(run_dir, "text"),
        lambda: load_modality(run_dir, "collab"),
    ]
    for call in calls:
        try:
            call()
        except MMRecError:
            pass
    try:
        data = PreparedData(run_dir)
        data.items, data.users, data.interactions, data.sequences, data.train_item_counts  # noqa: B018
        data.histories("valid"), data.histories("test")
    except MMRecError:
        pass


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared run with text embeddings, built through the artifact layer (no text model needed)."""
    return make_prepared_run(tmp_path_factory.mktemp("loaders") / "run", num_users=4, num_items=5, text_dim=2)


@HOSTILE
@given(
    replacement=st.one_of(mmrec_tables(), embedding_tables(),
                          st.tuples(st.sampled_from(["items", "users", "interactions", "emb_text"]), JUNK)),
    resign_manifest=rarely(st.just(True), st.just(False), one_in=4),
)
def test_loaders_on_damaged_tables(replacement: tuple[str, pa.Table | bytes], resign_manifest: bool, text_run: Path) -> None:
    target, content = replacement
    with scratch(None) as (raw, _):
        run_dir = raw / "run"
        shutil.copytree(text_run, run_dir)
        path = run_dir / "prepare" / f"{target}.parquet"
        if isinstance(content, pa.Table):
            pq.write_table(content, path)
        else:
            write_bytes(path, content)
        if resign_manifest:
            resign(run_dir / "prepare", target)
        exercise_loaders(run_dir)


@HOSTILE
@given(
    changes=st.dictionaries(st.sampled_from(MANIFEST_KEYS), JSON_VALUES, max_size=3),
    junk=rarely(st.none(), st.one_of(JUNK, st.just(b"[" * 5000), st.just(b'"just a string"')), one_in=4),
)
def test_loaders_on_damaged_manifests(changes: dict[str, Any], junk: bytes | None, text_run: Path) -> None:
    with scratch(None) as (raw, _):
        run_dir = raw / "run"
        shutil.copytree(text_run, run_dir)
        path = run_dir / "prepare" / MANIFEST
        if junk is not None:
            write_bytes(path, junk)
        else:
            data = json.loads(path.read_text())
            data.update(changes)
            path.write_text(json.dumps(data))
        exercise_loaders(run_dir)


# -- what the property tests found, pinned -------------------------------------------------------------------
# Each case is a minimal input that once escaped as a traceback (or, for timestamps, was silently wrong);
# kept as plain examples so that they stay covered whatever examples hypothesis draws.


def _parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def _seqtxt(raw: Path, *extra: str, sequences: bytes | str = GOOD_SEQUENCES, items: str = GOOD_ITEMS) -> list[str]:
    return ["--source", "SeqTxt", "--source.sequences", str(write_bytes(raw / "seq.txt", sequences)),
            "--source.items", str(write_bytes(raw / "items.csv", items)), *extra]


def _log(raw: Path, table: pa.Table) -> list[str]:
    return ["--source", "Interactions", "--source.path", str(_parquet(raw / "log.parquet", table))]


def _config(raw: Path, changes: dict[str, Any]) -> list[str]:
    config = {**valid_config(raw), **changes}
    _seqtxt(raw)
    path = raw / "prepare.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["--config", str(path)]


def _renamed_column(raw: Path) -> list[str]:
    data = parquet_bytes(pa.table({"item_id": ["i1"], "embedding": [[0.1, 0.2]]}))
    path = write_bytes(raw / "emb.parquet", data.replace(b"embedding", b"\x90mbedding"))  # not UTF-8 any more
    return _seqtxt(raw, "--image.precomputed", str(path))


def _npz(raw: Path, **arrays: np.ndarray) -> list[str]:
    np.savez(raw / "emb.npz", **arrays)
    return _seqtxt(raw, "--image.precomputed", str(raw / "emb.npz"))


def _corrupt_gzip_reviews(raw: Path) -> list[str]:
    data = gzip.compress(b'{"reviewerID": "A", "asin": "B1", "unixReviewTime": 1}\n' * 50)
    reviews = write_bytes(raw / "reviews.json.gz", data[:10] + b"\xff" + data[11:])  # deflate block type 3: invalid
    return ["--source", "Amazon2014", "--source.reviews", str(reviews), "--source.meta",
            str(write_bytes(raw / "meta.json", "{'asin': 'B1', 'title': 'x'}"))]


def _huge_review_time(raw: Path) -> list[str]:
    reviews = write_bytes(raw / "reviews.json", json.dumps({"reviewerID": "A", "asin": "B1", "unixReviewTime": 2**70}))
    return ["--source", "Amazon2014", "--source.reviews", str(reviews), "--source.meta",
            str(write_bytes(raw / "meta.json", "{'asin': 'B1', 'title': 'x'}"))]


FAR_ZONED = pa.array([2**40] * 3, pa.timestamp("s", tz="Europe/Paris"))
FOUND_IN_PREPARE = {
    "sequences not UTF-8": (lambda raw: _seqtxt(raw, sequences=b"u1 i1 i2 i3\n\xff\xfe\n"), "line 2: not UTF-8 text"),
    "binary ids in Parquet": (lambda raw: _log(raw, pa.table({"user_id": pa.array([b"\x80"] * 3), "item_id": ["i1", "i2", "i3"],
                                                             "timestamp": [1, 2, 3]})), "cannot be read as text ids"),
    "far zoned timestamps as ids": (lambda raw: _log(raw, pa.table({"user_id": FAR_ZONED, "item_id": ["i1", "i2", "i3"],
                                                                    "timestamp": [1, 2, 3]})), "cannot be read as text ids"),
    "far zoned timestamps": (lambda raw: _log(raw, pa.table({"user_id": ["u1"] * 3, "item_id": ["i1", "i2", "i3"],
                                                             "timestamp": FAR_ZONED})), None),
    "boolean timestamps": (lambda raw: ["--source", "Interactions", "--source.path", str(write_bytes(
        raw / "log.csv", "user_id,item_id,timestamp\nu1,i1,True\nu1,i2,False\nu1,i3,True\n"))], "no usable timestamp"),
    "timestamps beyond int64": (lambda raw: ["--source", "Interactions", "--source.path", str(write_bytes(
        raw / "log.csv", "user_id,item_id,timestamp\nu1,i1,1\nu1,i2,99999999999999999999\nu1,i3,3\n"))],
        "line 3: column 'timestamp' has no usable timestamp"),
    "digits of another script": (lambda raw: ["--source", "Interactions", "--source.path", str(write_bytes(
        raw / "log.csv", "user_id,item_id,timestamp\nu1,i1,١٢٣\nu1,i2,2014-01-01\nu1,i3,2015-01-01\n"))], None),
    "id column as text column": (lambda raw: _seqtxt(raw, "--source.text_columns", "[item, item]"), "is the id column"),
    "template spec for a text": (lambda raw: _seqtxt(raw, "--text.template", "{brand:.2f}"), "cannot be formatted"),
    "unknown read_csv option": (lambda raw: _seqtxt(raw, "--source.read_options", '{"bogus": 1}'), "unexpected keyword"),
    "unknown encoding": (lambda raw: _seqtxt(raw, "--source.read_options", '{"encoding": "nope"}'), "unknown encoding"),
    "damaged Parquet column name": (_renamed_column, "not a readable Parquet file"),
    "complex embeddings": (lambda raw: _npz(raw, item_id=np.array(["i1"]), embedding=np.array([[1j]])), "complex"),
    "0-d id array": (lambda raw: _npz(raw, item_id=np.array("i1"), embedding=np.zeros((1, 2))), "must be [N]"),
    "0-d embeddings": (lambda raw: _npz(raw, item_id=np.array(["i1"]), embedding=np.zeros((1, 0))), "0-d"),
    "corrupt gzip": (_corrupt_gzip_reviews, "cannot be read"),
    "review time beyond int64": (_huge_review_time, "is not a 64-bit integer"),
    "config key inside a config": (lambda raw: _config(raw, {"config": False}), "cannot be parsed"),
    "null seed": (lambda raw: _config(raw, {"seed": None}), "seed must be an integer"),
    "null source": (lambda raw: _config(raw, {"source": None}), "source must be set"),
    "negative seed": (lambda raw: _seqtxt(raw, "--seed=-1"), "seed must be an integer between 0"),
    "null number": (lambda raw: ["--source", "Synthetic", "--source.num_users", "null"], "must be an integer"),
    "extreme popularity skew": (lambda raw: ["--source", "Synthetic", "--source.num_users", "20",
                                             "--source.popularity_skew", "1e308"], "popularity_skew must be between"),
    "zero image batch": (lambda raw: _seqtxt(raw, "--image.precomputed", str(raw / "seq.txt"), "--image.batch_size", "0"),
                         "image.batch_size must be at least 1"),
}


@pytest.mark.parametrize("case", sorted(FOUND_IN_PREPARE))
def test_found_in_prepare(case: str, previous_run: Path) -> None:
    build, message = FOUND_IN_PREPARE[case]
    with scratch(previous_run) as (raw, run_dir):
        argv = build(raw)
        check_contract(run_dir, [*argv, "--text.enabled", "false"])
        code, _, err = prepare(*argv, "--text.enabled", "false", "--run_dir", str(run_dir))
        assert (code == 0) if message is None else (code == 2 and message in err), err


def test_library_messages_over_several_lines_print_as_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """pyarrow and pandas messages span lines; the error line must stay one line whatever it quotes."""
    from mmrec.data.sources import SeqTxt
    from mmrec.errors import InputError

    def fail(self: SeqTxt, seed: int) -> None:
        raise InputError("seq.txt: cannot be read (Couldn't deserialize thrift:\n  TProtocolException: Invalid data\n)")

    monkeypatch.setattr(SeqTxt, "load", fail)
    code, _, err = prepare(*_seqtxt(tmp_path), "--run_dir", str(tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1 and "thrift: TProtocolException: Invalid data" in err, err


def _manifest(change: dict[str, Any]) -> Any:
    def apply(folder: Path) -> None:
        data = json.loads((folder / MANIFEST).read_text())
        data.update(change)
        (folder / MANIFEST).write_text(json.dumps(data))
    return apply


def _table(name: str, table: pa.Table, schema: pa.Schema | None = None) -> Any:
    def apply(folder: Path) -> None:
        metadata = schema.metadata if schema is not None else {b"mmrec.schema": b"embeddings/1"}
        pq.write_table(table.replace_schema_metadata(metadata), folder / f"{name}.parquet")
        resign(folder, name)
    return apply


FOUND_IN_LOADERS = {
    "manifest not UTF-8": (lambda folder: write_bytes(folder / MANIFEST, b"\x80"), "not a valid mmrec manifest"),
    "manifest nested too deep": (lambda folder: write_bytes(folder / MANIFEST, b"[" * 5000), "not a valid mmrec manifest"),
    "output outside the folder": (_manifest({"outputs": {"items": {"file": "../../x", "sha256": "0"}}}),
                                  "must name a file in the stage folder"),
    "outputs not a mapping": (_manifest({"outputs": 5}), "'outputs' must be a dict"),
    "lineage not a mapping": (_manifest({"lineage": []}), "'lineage' must be a dict"),
    "nulls in a required column": (_table("users", pa.table({"user_idx": pa.array([0, None, 2, 3], pa.int32()),
                                                             "user_id": ["a", "b", "c", "d"]}), USERS), "null value"),
    "users not numbered 0..N-1": (_table("users", pa.table({"user_idx": pa.array([0, 1, 2, 7], pa.int32()),
                                                            "user_id": ["a", "b", "c", "d"]}), USERS), "must be 0..3 in order"),
    "variable-width embeddings": (_table("emb_text", pa.table({"item_idx": pa.array(range(5), pa.int32()),
                                                               "present": [True] * 5,
                                                               "embedding": pa.array([[0.0, 1.0]] * 5, pa.list_(pa.float32()))})),
                                  "column 'embedding' has type list<element: float>, expected fixed_size_list<float, d>"),
    "nulls inside vectors": (_table("emb_text", pa.table({"item_idx": pa.array(range(5), pa.int32()), "present": [True] * 5,
                                                          "embedding": pa.array([[0.0, None]] * 5, pa.list_(pa.float32(), 2))})),
                             "null values inside its vectors"),
}


@pytest.mark.parametrize("case", sorted(FOUND_IN_LOADERS))
def test_found_in_loaders(case: str, text_run: Path, tmp_path: Path) -> None:
    damage, message = FOUND_IN_LOADERS[case]
    run_dir = tmp_path / "run"
    shutil.copytree(text_run, run_dir)
    damage(run_dir / "prepare")
    with pytest.raises(MMRecError, match=re.escape(message)):
        PreparedData(run_dir).interactions  # noqa: B018
        load_modality(run_dir, "text")


# -- safe loading ----------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this writes a marker file: if the marker appears, something unpickled untrusted data."""

    marker: Path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (Path.write_text, (self.marker, "unpickled"))  # type: ignore[arg-type]


def test_pickles_are_refused_never_loaded(tmp_path: Path, previous_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A precomputed NPZ, a text-cache entry and an ``.npy`` image holding pickled objects are refused (or, for
    the cache, recomputed); none of them is ever unpickled."""
    from mmrec.cache import model_fingerprint
    from mmrec.data import text_embeddings
    from mmrec.data.image_embeddings import read_image
    from mmrec.data.text_embeddings import TextOptions, cache_key, embed_texts

    Payload.marker = tmp_path / "marker"
    hostile = np.array([Payload(), Payload()], dtype=object)
    np.savez(tmp_path / "emb.npz", item_id=hostile, embedding=np.zeros((2, 2)))
    with scratch(previous_run) as (raw, run_dir):
        code, _, err = prepare(*_seqtxt(raw), "--image.precomputed", str(tmp_path / "emb.npz"), "--text.enabled", "false",
                               "--run_dir", str(run_dir))
        assert code == 2 and "pickle" in err, err

    class Encoder:
        def encode(self, texts: list[str], **_: Any) -> np.ndarray:
            return np.ones((len(texts), 2), np.float32)

    monkeypatch.setattr(text_embeddings, "load_encoder", lambda model, device: Encoder())
    options = TextOptions(model="stub", cache_dir=str(tmp_path / "cache"))
    entry = tmp_path / "cache" / "text-embeddings" / f"{cache_key(model_fingerprint('stub'), False, ['a'])}.npy"
    entry.parent.mkdir(parents=True)
    np.save(entry, hostile, allow_pickle=True)
    assert not embed_texts(["a"], options).cache_hit  # recomputed, not unpickled

    np.save(tmp_path / "image.npy", hostile, allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        read_image(str(tmp_path / "image.npy"), None)
    assert not Payload.marker.exists()


UNSAFE = {
    "torch.load without weights_only=True": r"torch\.load\((?![^)]*weights_only=True)",
    "allow_pickle=True": r"allow_pickle\s*=\s*True",
    "pickle": r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve|marshal)\b",
    "eval/exec": r"(?<![.\w])(eval|exec)\(",
    "yaml without the safe loader": r"yaml\.(load|unsafe_load|full_load)\(",
    "trust_remote_code on by default": r"trust_remote_code\s*(:\s*bool\s*)?=\s*True",
}


@pytest.mark.parametrize("pattern", sorted(UNSAFE))
def test_no_unsafe_loading_in_the_package(pattern: str) -> None:
    """A guard over the whole package: whatever loads data must not be able to run code from it."""
    root = Path(__file__).resolve().parents[1] / "mmrec"
    found = [
        f"{path.relative_to(root.parent)}:{number}"
        for path in sorted(root.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(UNSAFE[pattern], line)
    ]
    assert not found, f"{pattern}: {', '.join(found)}"
