"""`mmrec report`: one self-contained HTML page (parsed here with the standard library's parser), curves from
the default CSV logger, and the one-line error without matplotlib."""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mmrec.cli import main as mmrec
from mmrec.reporting.html import SECTIONS
from tests.fixtures import make_prepared_run

CONF = Path(__file__).resolve().parent / "conf"


class Page(HTMLParser):
    """Sections, images, every attribute value and every tag of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.attributes: list[str] = []
        self.tags: set[str] = set()
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        self.attributes.extend(v for v in values.values() if v)
        if tag == "section":
            self.sections.append(values["id"])
        if tag == "img":
            self.images.append(values["src"])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run: SASRec trained with the default logger, quantizer and SIDs, two tested models, one with slices."""
    run = make_prepared_run(tmp_path_factory.mktemp("report") / "run")
    steps = [
        ["fit-collab", "--config", str(CONF / "fit-collab.yaml"), "--trainer.logger", "null", "--trainer.max_steps", "6",
         "--trainer.log_every_n_steps", "1"],
        ["fit-quantizer", "--config", str(CONF / "fit-quantizer.yaml"), "--trainer.max_epochs", "1"],
        ["assign-sids", "--config", str(CONF / "assign-sids.yaml")],
        ["test", "--config", str(CONF / "test.yaml"), "--model", "popularity"],
        ["test", "--config", str(CONF / "test.yaml"), "--model", "sasrec"],
    ]
    for step in steps:
        assert mmrec([*step, "--run_dir", str(run)]) == 0, step
    metrics = json.loads((run / "test" / "sasrec-test" / "metrics.json").read_text())
    metrics["slices"] = {"history length": {"1-5": {"recall@10": 0.5, "ndcg@10": 0.25}, "6+": {"recall@10": 0.75, "ndcg@10": 0.125}}}
    (run / "test" / "sasrec-sliced").mkdir()
    (run / "test" / "sasrec-sliced" / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_report_is_one_self_contained_page(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mmrec(["report", "--run_dir", str(run)]) == 0
    assert "3 tested models, 2 trained stages" in capsys.readouterr().out
    text = (run / "report.html").read_text()
    page = Page(text)
    assert page.sections == list(SECTIONS)
    assert len(page.images) >= 5 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert not [value for value in page.attributes if "://" in value]
    assert not page.tags & {"link", "script", "iframe", "object"}
    for expected in ("popularity-test", "sasrec-test", "history masked", "6+", "collab", "colliding items before",
                     "fit-collab", "fit-quantizer", "peak GPU memory (GiB)", "logs/version_0/metrics.csv"):
        assert expected in text, expected
    assert "no curves logged" not in text  # both training stages logged CSV curves by default
    assert not list(run.glob(".report.html*"))  # written atomically


def test_a_stage_without_a_logger_says_so(run: Path, tmp_path: Path) -> None:
    other = make_prepared_run(tmp_path / "run")
    assert mmrec(["fit-collab", "--config", str(CONF / "fit-collab.yaml"), "--run_dir", str(other)]) == 0  # logger: false
    assert mmrec(["report", "--run_dir", str(other)]) == 0
    text = (other / "report.html").read_text()
    assert "no curves logged" in text and "no tested model" in text and "no assign-sids report" in text


def test_without_matplotlib_one_line_names_the_extra(run: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert mmrec(["report", "--run_dir", str(run), "--output", str(run / "other.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mmrec[plot]" in err and not (run / "other.html").exists()
