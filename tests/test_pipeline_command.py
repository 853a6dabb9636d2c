"""`mmrec pipeline` on the tiny configs: a first run, a second that finds every step up to date and touches
nothing, one changed fit-recommender override that re-runs only it and the test that reads it, --force and
--until, and a failing stage that stops the pipeline with one line. The tests share one run directory and
build on each other, in file order.

Stages run as the runner starts them on Linux: forks of this process, which has the stack imported already.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import yaml

from mmrec import cli
from mmrec.logs import quiet_third_party

CONF = Path(__file__).resolve().parent / "conf"


def write_pipeline(folder: Path, recommender_args: dict | None = None, extra: dict | None = None) -> Path:
    """A pipeline YAML of the tiny configs (no text encoder, no generative head: seconds on a CPU)."""
    stages = {
        "prepare": {"config": str(CONF / "prepare.yaml")},
        "fit-collab": {"config": str(CONF / "fit-collab.yaml")},
        "fit-quantizer": {"config": str(CONF / "fit-quantizer.yaml"), "args": {"data.modalities": ["collab", "image"]}},
        "assign-sids": {"config": str(CONF / "assign-sids.yaml")},
        "fit-recommender": {"config": str(CONF / "fit-recommender.yaml"),
                            "args": {"model.modalities": ["collab", "image"], **(recommender_args or {})}},
        "test": {"config": str(CONF / "test.yaml"), "models": ["popularity", "sasrec", "fusion"]},
        **(extra or {}),
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(folder / "run"), "stages": stages}, sort_keys=False))
    return path


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    """Every file of a run directory with its size and modification time."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def ran(out: str) -> list[str]:
    return [line.split(":")[0] for line in out.splitlines() if ": running (" in line]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


def test_second_run_is_up_to_date_and_touches_nothing(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_pipeline(workdir)
    assert cli.main(["pipeline", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    steps = ["prepare", "fit-collab", "fit-quantizer", "assign-sids", "fit-recommender", "test/popularity", "test/sasrec",
             "test/fusion"]
    assert ran(out) == steps
    table = out.split("models tested in")[1]
    assert all(model in table for model in ("popularity", "sasrec", "fusion")) and "N@10" in table

    before = snapshot(workdir / "run")
    assert cli.main(["pipeline", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.endswith(": up to date")] == [f"{s}: up to date" for s in steps]
    assert "models tested in" in out
    assert snapshot(workdir / "run") == before


def test_changed_override_reruns_only_the_recommender_and_its_test(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_pipeline(workdir, recommender_args={"model.proj_dim": 8})
    assert cli.main(["pipeline", "--config", str(config)]) == 0
    assert ran(capsys.readouterr().out) == ["fit-recommender", "test/fusion"]


def test_force_reruns_what_reads_the_step_and_until_stops(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_pipeline(workdir, recommender_args={"model.proj_dim": 8})
    assert cli.main(["pipeline", "--config", str(config), "--force", "assign-sids", "--until", "fit-recommender"]) == 0
    out = capsys.readouterr().out
    assert ran(out) == ["assign-sids", "fit-recommender"] and "assign-sids: running (forced)" in out
    assert "test/" not in out
    assert cli.main(["pipeline", "--config", str(config), "--until", "test"]) == 0
    assert ran(capsys.readouterr().out) == ["test/fusion"]  # the fusion test read the retrained recommender


def test_failing_stage_stops_with_one_line_and_keeps_finished_stages(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = {"broken": {"stage": "prepare", "config": str(CONF / "prepare.yaml"), "args": {"seed": -1}}}
    config = write_pipeline(workdir, recommender_args={"model.proj_dim": 8}, extra=broken)
    assert cli.main(["pipeline", "--config", str(config), "--until", "test"]) == 0  # the steps before: up to date
    capsys.readouterr()
    before = snapshot(workdir / "run")
    assert cli.main(["pipeline", "--config", str(config), "--until", "broken"]) == 2
    captured = capsys.readouterr()
    error = "mmrec pipeline: error: broken: seed must be an integer between 0 and 9223372036854775807, got -1"
    assert captured.err.strip().splitlines() == [error]
    assert "models tested in" not in captured.out
    assert snapshot(workdir / "run") == before


def test_unknown_step_and_stage_are_one_line_errors(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_pipeline(workdir)
    assert cli.main(["pipeline", "--config", str(config), "--force", "fit-everything"]) == 2
    assert capsys.readouterr().err.startswith("mmrec pipeline: error: --force: no step named fit-everything;")
    config = write_pipeline(workdir, extra={"train": {"config": str(CONF / "test.yaml")}})
    assert cli.main(["pipeline", "--config", str(config)]) == 2
    assert "stages.train: unknown stage 'train'" in capsys.readouterr().err


def test_quiet_logs_drop_only_the_known_third_party_messages(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: try installing litlogger")
        logger.info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == ["GPU available: False, used: False"]
