"""`mmrec fit-quantizer` end to end on the tiny run directory: outputs, manifest, reload, resume, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmrec.artifacts import Manifest
from mmrec.artifacts.exports import read_quantizer
from mmrec.artifacts.manifest import file_sha256
from mmrec.cli import main
from mmrec.data.datamodules import ItemFeatureDataModule
from mmrec.models.mm_rqvae import MMRQVAE

CONFIG = str(Path(__file__).parent / "conf" / "fit-quantizer.yaml")


def fit(run: Path, *extra: str) -> int:
    return main(["fit-quantizer", "--run_dir", str(run), "--config", CONFIG, *extra])


def test_fit_quantizer_end_to_end(tiny_run: Path) -> None:
    assert fit(tiny_run) == 0
    out = tiny_run / "fit-quantizer"
    manifest = Manifest.read(out)

    assert set(manifest.outputs) == {"quantizer", "quantizer_config", "codebooks"}
    for name in manifest.outputs:
        manifest.verify_output(out, name)
    assert manifest.lineage["quantizer"] == file_sha256(out / "quantizer.safetensors")
    prepare = Manifest.read(tiny_run / "prepare")
    assert manifest.lineage["items"] == prepare.lineage["items"]
    assert set(manifest.inputs) == {"emb_collab", "emb_text"}
    assert manifest.seed == 0 and manifest.config["model"]["codebook_size"] == 8

    metrics = manifest.extra["metrics"]
    assert metrics["text"]["items"] == 39 and metrics["collab"]["items"] == 40
    for m in ("collab", "text"):
        assert len(metrics[m]["utilisation"]) == 2 and 0 < min(metrics[m]["utilisation"]) <= 1
        assert set(metrics[m]) >= {"perplexity", "unique_tuple_fraction", "recon_cosine", "kendall_tau"}
    assert manifest.extra["wall_time_s"] > 0 and manifest.extra["epochs"] == 3

    books = load_file(str(out / "codebooks.safetensors"))
    assert sorted(books) == ["collab.0", "collab.1", "text.0", "text.1"]
    assert all(b.shape == (8, 8) and b.dtype == torch.float32 for b in books.values())

    model = MMRQVAE.from_state(*read_quantizer(out))
    assert model.hparams.input_dims == {"collab": 8, "text": 16}
    assert torch.equal(model.codebooks()["text"][1], books["text.1"])
    data = ItemFeatureDataModule(run_dir=str(tiny_run), modalities=["collab", "text"])
    batch = next(iter(data.predict_dataloader()))
    codes = model.quantize(batch, return_distances=True)
    assert codes["text"].shape == (40, 2) and not codes["text_present"][0]
    assert codes["collab_last_distances"].shape == (40, 8)

    work = tiny_run / "fit-quantizer.work"
    assert (work / "checkpoints" / "last.ckpt").is_file()
    with open(next(work.glob("logs/version_*/metrics.csv"))) as handle:
        columns = set(next(csv.reader(handle)))
    assert {"train/loss", "train/collab/recon", "train/align/text", "text/util_l0", "text/ppl_l1", "collab/unique",
            "collab/recon_cos", "text/tau"} <= columns


def test_resume_continues_from_the_last_checkpoint(tiny_run: Path) -> None:
    assert fit(tiny_run, "--trainer.max_epochs", "2") == 0
    first = json.loads((tiny_run / "fit-quantizer" / "manifest.json").read_text())
    assert first["extra"]["epochs"] == 2
    assert fit(tiny_run, "--trainer.max_epochs", "3", "--resume", "true") == 0
    second = Manifest.read(tiny_run / "fit-quantizer")
    assert second.extra["epochs"] == 3 and second.extra["steps"] == 9


def test_single_modality_and_missing_modality(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fit(tiny_run, "--data.modalities", "[text]", "--trainer.max_epochs", "1") == 0
    books = load_file(str(tiny_run / "fit-quantizer" / "codebooks.safetensors"))
    assert sorted(books) == ["text.0", "text.1"]
    assert fit(tiny_run, "--data.modalities", "[text, image]") == 2
    assert "emb_image" in capsys.readouterr().err
