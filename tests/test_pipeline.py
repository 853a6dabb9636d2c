"""The whole pipeline through the `mmrec` command line, twice: the demo path works end to end and a fixed
seed reproduces it exactly on the CPU (byte-identical SIDs, identical metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmrec.cli import main

CONF = Path(__file__).resolve().parent / "conf"
MODALITIES = ["--data.modalities", "[collab,image]"]


def run_pipeline(run_dir: Path) -> dict[str, dict[str, float]]:
    """prepare -> fit-collab -> fit-quantizer -> assign-sids -> fit-recommender (both heads) -> test, on tiny
    configs."""
    steps = [
        ["prepare", "--config", str(CONF / "prepare.yaml")],
        ["fit-collab", "--config", str(CONF / "fit-collab.yaml")],
        ["fit-quantizer", "--config", str(CONF / "fit-quantizer.yaml"), *MODALITIES],
        ["assign-sids", "--config", str(CONF / "assign-sids.yaml")],
        ["fit-recommender", "--config", str(CONF / "fit-recommender.yaml"), "--model.modalities", "[collab,image]"],
        ["fit-recommender", "--config", str(CONF / "fit-recommender-generative.yaml")],
    ]
    for step in steps:
        assert main([*step, "--run_dir", str(run_dir)]) == 0, f"mmrec {step[0]} failed"
    metrics = {}
    for model in ("popularity", "sasrec", "fusion", "generative"):
        assert main(["test", "--config", str(CONF / "test.yaml"), "--run_dir", str(run_dir), "--model", model]) == 0
        metrics[model] = json.loads((run_dir / "test" / f"{model}-test" / "metrics.json").read_text())["metrics"]
    return metrics


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, dict]:
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    return first, second, run_pipeline(first), run_pipeline(second)


def test_every_stage_publishes_its_folder(two_runs: tuple[Path, Path, dict, dict]) -> None:
    first = two_runs[0]
    for stage in ("prepare", "fit-collab", "fit-quantizer", "assign-sids", "fit-recommender", "fit-recommender-generative"):
        assert (first / stage / "manifest.json").is_file(), stage
    assert not list(first.glob(".*.tmp-*")), "a temporary stage folder was left behind"


def test_same_seed_gives_identical_sids_and_metrics(two_runs: tuple[Path, Path, dict, dict]) -> None:
    first, second, first_metrics, second_metrics = two_runs
    sids = "assign-sids/sids.parquet"
    assert (first / sids).read_bytes() == (second / sids).read_bytes()
    assert first_metrics == second_metrics
