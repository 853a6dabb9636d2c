"""`mmrec fit-collab` then `mmrec test`, end to end; lineage; resuming; SASRec beats popularity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.artifacts import Manifest
from mmrec.cli import main as mmrec
from mmrec.data.prepared import PreparedData, load_modality
from mmrec.errors import LineageError
from mmrec.evaluation.loaders import load_sasrec
from tests.fixtures import make_prepared_run

CONFIGS = sorted(Path("configs").glob("*/fit-collab.yaml")) + sorted(Path("tests/conf").glob("fit-collab*.yaml"))
TEST_CONFIGS = sorted(Path("configs").glob("*/test.yaml")) + sorted(Path("tests/conf").glob("test*.yaml"))


def fit(run: Path, *overrides: str) -> None:
    assert mmrec(["fit-collab", "--config", "tests/conf/fit-collab.yaml", "--run_dir", str(run), *overrides]) == 0


def metrics(run: Path, model: str, split: str = "test") -> dict:
    assert mmrec(["test", "--config", "tests/conf/test.yaml", "--run_dir", str(run), "--model", model, "--split", split]) == 0
    return json.loads((run / "test" / f"{model}-{split}" / "metrics.json").read_text())


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_fit_collab_configs_parse(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mmrec(["fit-collab", "--config", str(config), "--print_config"]) == 0
    assert "val/ndcg@10" in capsys.readouterr().out


@pytest.mark.parametrize("config", TEST_CONFIGS, ids=str)
def test_test_configs_parse(config: Path) -> None:
    assert mmrec(["test", "--config", str(config), "--print_config"]) == 0


def test_fit_collab_exports_the_collab_modality_then_test_evaluates_it(tiny_run: Path) -> None:
    fit(tiny_run)
    folder = tiny_run / "fit-collab"
    manifest = Manifest.read(folder)
    prepare = Manifest.read(tiny_run / "prepare")
    assert manifest.lineage == prepare.lineage
    assert manifest.inputs["interactions"]["sha256"] == prepare.outputs["interactions"]["sha256"]
    assert {"emb_collab", "sasrec", "sasrec_config"} <= set(manifest.outputs)
    assert manifest.extra["best_val"]["ndcg@10"] > 0 and manifest.extra["best_checkpoint"].endswith(".ckpt")
    collab = load_modality(tiny_run, "collab")
    trained = PreparedData(tiny_run).train_item_counts > 0  # the tiny run has items only its last two hold
    assert collab.matrix.shape == (40, 16) and np.array_equal(collab.present, trained) and not trained.all()
    assert (tiny_run / "fit-collab.work" / "checkpoints" / "last.ckpt").is_file()

    document = metrics(tiny_run, "sasrec", "valid")
    assert document["checkpoint"]["path"] == str((folder / "sasrec.safetensors").resolve())
    # the exported model is the best checkpoint, so its validation figure is the one the manifest records
    assert document["metrics"]["ndcg@10"] == pytest.approx(manifest.extra["best_val"]["ndcg@10"], abs=1e-6)

    last = tiny_run / "fit-collab.work" / "checkpoints" / "last.ckpt"
    assert mmrec(["test", "--run_dir", str(tiny_run), "--model", "sasrec", "--checkpoint", str(last), "--device", "cpu"]) == 0
    document = json.loads((tiny_run / "test" / "sasrec-test" / "metrics.json").read_text())
    assert document["checkpoint"]["path"] == str(last.resolve())


def test_resume_continues_from_the_last_checkpoint(tiny_run: Path) -> None:
    fit(tiny_run)
    fit(tiny_run, "--resume", "true", "--trainer.max_steps", "4")
    extra = Manifest.read(tiny_run / "fit-collab").extra
    assert extra["resumed_from"].endswith("last.ckpt") and extra["global_steps"] == 4


def test_a_model_trained_on_other_interactions_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    fit(tiny_run)
    other = make_prepared_run(tmp_path / "other", seed=1)
    shutil.copytree(tiny_run / "fit-collab", other / "fit-collab")
    with pytest.raises(LineageError, match="different"):
        load_sasrec(other, None, torch.device("cpu"))


def test_sasrec_beats_popularity_on_category_structured_data(tmp_path: Path) -> None:
    run = make_prepared_run(tmp_path / "run", num_users=300, num_items=60, num_categories=6, seq_len=(8, 16), seed=3)
    fit(run, "--trainer.max_steps", "-1", "--trainer.max_epochs", "6", "--data.batch_size", "64",
        "--model.hidden_size", "32", "--model.lr", "0.01", "--model.dropout", "0.1")
    learned, counted = metrics(run, "sasrec")["metrics"], metrics(run, "popularity")["metrics"]
    assert learned["ndcg@10"] > 1.5 * counted["ndcg@10"]  # seen: 0.67 vs 0.36
    assert learned["recall@10"] > counted["recall@10"] + 0.1
