"""`mmrec assign-sids` end to end: outputs, determinism, lineage and modality checks, load_sids.

Most tests use a stand-in quantizer (plain residual nearest-code quantization of the raw inputs, no
encoder) published as a ``fit-quantizer`` folder, so that its codes are known exactly; one test runs the
real MM-RQ-VAE through ``fit-quantizer`` first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmrec.artifacts import Manifest, stage_output
from mmrec.artifacts.manifest import file_sha256
from mmrec.artifacts.schemas import SIDS
from mmrec.cli import main as mmrec_main
from mmrec.data.prepared import load_modality, load_sids
from mmrec.errors import InputError, LineageError
from mmrec.models.sid_embedding import SIDEmbedding
from mmrec.stages import assign_sids
from tests.fixtures import make_prepared_run, write_modality

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests/conf/assign-sids.yaml")


class StandInQuantizer(nn.Module):
    """The quantizer API ``SIDMapper`` relies on, over fixed codebooks applied to the raw inputs."""

    def __init__(self, books: dict[str, list[torch.Tensor]]) -> None:
        super().__init__()
        self.books = books

    @classmethod
    def from_folder(cls, folder: Path) -> StandInQuantizer:
        flat = load_file(str(folder / "codebooks.safetensors"))
        levels: dict[str, int] = {}
        for key in flat:
            modality = key.split(".")[0]
            levels[modality] = levels.get(modality, 0) + 1
        return cls({m: [flat[f"{m}.{level}"] for level in range(n)] for m, n in sorted(levels.items())})

    def codebooks(self) -> dict[str, list[torch.Tensor]]:
        return self.books

    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: batch[m].float() for m in self.books}

    def quantize(self, batch: dict[str, torch.Tensor], return_distances: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for m, books in self.books.items():
            residual, codes = batch[m].float(), []
            for book in books:
                distances = torch.cdist(residual, book).pow(2)
                codes.append(distances.argmin(1))
                residual = residual - book[codes[-1]]
            out[m] = torch.stack(codes, 1)
            if return_distances:
                out[f"{m}_last_distances"] = distances
        return out


def publish_quantizer(run: Path, books: dict[str, list[torch.Tensor]], folder: str = "fit-quantizer") -> Path:
    """A ``fit-quantizer``-like folder holding only codebooks, with the lineage of ``run``'s prepare."""
    prepared = Manifest.read(run / "prepare")
    manifest = Manifest(stage="fit-quantizer", config={"source": "tests"}, lineage=dict(prepared.lineage))
    with stage_output(run, folder, manifest) as out:
        save_file({f"{m}.{level}": b.contiguous() for m, levels in books.items() for level, b in enumerate(levels)},
                  str(out / "codebooks.safetensors"))
        manifest.add_output("codebooks", out / "codebooks.safetensors")
        manifest.lineage["quantizer"] = file_sha256(out / "codebooks.safetensors")
    return run / folder


def coarse_books(run: Path, first: int = 4, second: int = 32) -> dict[str, list[torch.Tensor]]:
    """Two levels per modality: ``first`` item vectors, then ``second`` small random residual codes."""
    rng = np.random.default_rng(3)
    books = {}
    for m in ("collab", "text"):
        matrix = load_modality(run, m).matrix
        level_a = torch.from_numpy(matrix[1 : first + 1].copy())
        level_b = torch.from_numpy(0.3 * rng.normal(size=(second, matrix.shape[1])).astype(np.float32))
        books[m] = [level_a, level_b]
    return books


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assign_sids, "load_quantizer", StandInQuantizer.from_folder)


def run_stage(run: Path, *args: str) -> Path:
    assign_sids.main(["--config", CONFIG, "--run_dir", str(run), *args])
    return run / "assign-sids"


@pytest.mark.parametrize("mode", ["suffix", "reassign"])
def test_every_item_with_content_gets_a_unique_sid(tiny_run: Path, stand_in: None, mode: str) -> None:
    publish_quantizer(tiny_run, coarse_books(tiny_run))
    out = run_stage(tiny_run, "--model.collisions", mode)
    table = pq.read_table(out / "sids.parquet")
    assert table.schema.equals(SIDS, check_metadata=False)
    rows = table.to_pylist()
    assert [(r["modality"], r["item_idx"]) for r in rows] == sorted((r["modality"], r["item_idx"]) for r in rows)
    for m in ("collab", "text"):
        tuples = [tuple(r["codes"]) for r in rows if r["modality"] == m]
        assert len(set(tuples)) == len(tuples)
        assert len({len(t) for t in tuples}) == 1
    # item 0 has no text: no text row at all, but a collab one
    assert 0 not in {r["item_idx"] for r in rows if r["modality"] == "text"}
    assert sum(r["modality"] == "text" for r in rows) == 39 and sum(r["modality"] == "collab" for r in rows) == 40
    report = json.loads((out / "report.json").read_text())
    assert report["text"]["items_without_sid"] == 1
    assert report["text"]["collisions_before"]["colliding_items"] > 0
    assert report["text"]["collisions_after"]["colliding_items"] == 0
    assert report["text"]["resolution"]["applied"] == mode


def test_suffix_rows_carry_rank_and_token_string(tiny_run: Path, stand_in: None) -> None:
    publish_quantizer(tiny_run, coarse_books(tiny_run))
    rows = pq.read_table(run_stage(tiny_run) / "sids.parquet").to_pylist()
    text = [r for r in rows if r["modality"] == "text"]
    assert all(len(r["codes"]) == 3 for r in text)
    first = {}
    for r in text:  # the first item (lowest item_idx) of every quantizer tuple gets suffix 0
        first.setdefault(tuple(r["codes"][:2]), r["codes"][2])
    assert set(first.values()) == {0}
    a, b, c = text[0]["codes"]
    assert text[0]["sid"] == f"<a_{a}><b_{b}><c_{c}>"


def test_outputs_and_manifest(tiny_run: Path, stand_in: None) -> None:
    quantizer = publish_quantizer(tiny_run, coarse_books(tiny_run))
    out = run_stage(tiny_run)
    assert {"sids.parquet", "codebooks.safetensors", "report.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    manifest = Manifest.read(out)
    prepared = Manifest.read(tiny_run / "prepare")
    assert manifest.lineage["items"] == prepared.lineage["items"]
    assert manifest.lineage["quantizer"] == Manifest.read(quantizer).lineage["quantizer"]
    assert manifest.lineage["sids"] == file_sha256(out / "sids.parquet")
    assert {"items", "quantizer.codebooks", "emb_text", "emb_collab"} <= set(manifest.inputs)
    assert manifest.extra["report"]["text"]["collisions_after"]["colliding_items"] == 0
    books = load_file(str(out / "codebooks.safetensors"))
    assert sorted(books) == ["collab.0", "collab.1", "text.0", "text.1"]  # no codebook for the suffix level


def test_same_inputs_give_byte_identical_sids(tiny_run: Path, stand_in: None) -> None:
    publish_quantizer(tiny_run, coarse_books(tiny_run))
    first = run_stage(tiny_run, "--model.collisions", "reassign")
    sids, report = (first / "sids.parquet").read_bytes(), (first / "report.json").read_bytes()
    second = run_stage(tiny_run, "--model.collisions", "reassign", "--data.eval_batch_size", "7")
    assert (second / "sids.parquet").read_bytes() == sids
    assert (second / "report.json").read_bytes() == report


def test_identity_quantizer_preserves_distances(tiny_run: Path, stand_in: None) -> None:
    """One level whose codes are the items' own vectors: code space is the input space, tau = 1."""
    books = {m: [torch.from_numpy(load_modality(tiny_run, m).matrix.copy())] for m in ("collab", "text")}
    publish_quantizer(tiny_run, books)
    report = json.loads((run_stage(tiny_run) / "report.json").read_text())
    for m in ("collab", "text"):
        assert report[m]["kendall_tau"] > 0.99
        assert report[m]["kendall_tau_encoder"] == pytest.approx(1.0)  # the stand-in encodes as the identity
        assert report[m]["kendall_tau_quantization"] > 0.99
        assert abs(report[m]["kendall_tau_random"]) < 0.15
        assert report[m]["collisions_before"]["colliding_items"] == 0


def test_quantizer_of_another_catalogue_is_refused(tiny_run: Path, stand_in: None, tmp_path: Path) -> None:
    other = make_prepared_run(tmp_path / "other", num_categories=5)
    write_modality(other, "fit-collab", "collab", np.ones((40, 8), dtype=np.float32))
    foreign = publish_quantizer(other, coarse_books(other))
    with pytest.raises(LineageError, match="different 'items'") as error:
        run_stage(tiny_run, "--quantizer_dir", str(foreign))
    assert str(foreign / "manifest.json") in str(error.value)
    assert str(tiny_run / "prepare" / "manifest.json") in str(error.value)


def test_modalities_must_match_the_quantizer(
    tiny_run: Path, stand_in: None, capsys: pytest.CaptureFixture[str]
) -> None:
    quantizer = publish_quantizer(tiny_run, coarse_books(tiny_run))
    with pytest.raises(InputError, match="data.modalities"):
        run_stage(tiny_run, "--data.modalities", "[text]")
    code = mmrec_main(["assign-sids", "--config", CONFIG, "--run_dir", str(tiny_run), "--data.modalities", "[text]"])
    assert code == 2 and str(quantizer / "codebooks.safetensors") in capsys.readouterr().err


def test_load_sids_feeds_sid_embedding(tiny_run: Path, stand_in: None) -> None:
    books = coarse_books(tiny_run)
    publish_quantizer(tiny_run, books)
    run_stage(tiny_run)
    _, codes, codebooks = load_sids(tiny_run, "text")
    assert codes.shape == (40, 3) and (codes[0] == -1).all() and (codes[1:] >= 0).all()
    assert [tuple(b.shape) for b in codebooks] == [tuple(b.shape) for b in books["text"]]
    embedding = SIDEmbedding(codes, dim=16, scheme="prefix_ngram", codebooks=codebooks)
    vectors = embedding(torch.arange(40))
    expected = books["text"][0][codes[1:, 0]] + books["text"][1][codes[1:, 1]]
    assert torch.allclose(vectors[1:], expected, atol=1e-5)
    assert (vectors[0] == 0).all() and not embedding.mask(torch.tensor(0))
    with pytest.raises(InputError, match="no SIDs for modality 'image'"):
        load_sids(tiny_run, "image")


def test_load_sids_refuses_sids_of_another_catalogue(tiny_run: Path, stand_in: None, tmp_path: Path) -> None:
    publish_quantizer(tiny_run, coarse_books(tiny_run))
    out = run_stage(tiny_run)
    other = make_prepared_run(tmp_path / "other", num_categories=5)
    with pytest.raises(LineageError):
        load_sids(other, "text", folder=out)


def test_real_quantizer_end_to_end(tiny_run: Path) -> None:
    """fit-quantizer (MM-RQ-VAE, a few steps) then assign-sids: unique SIDs, reproducible bytes."""
    from mmrec.stages import fit_quantizer

    fit_quantizer.main([
        "--run_dir", str(tiny_run), "--seed_everything", "0", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "4", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--model.num_levels", "2", "--model.codebook_size", "8", "--model.code_dim", "4", "--model.hidden_dims", "[8]",
        "--model.kmeans_iters", "2", "--model.tau_pairs", "100", "--data.batch_size", "16",
    ])
    out = run_stage(tiny_run, "--model.collisions", "reassign")
    sids = (out / "sids.parquet").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"collab", "text"}
    assert all(r["collisions_after"]["colliding_items"] == 0 for r in report.values())
    assert all(r["codebook_sizes"] == [8, 8] for r in report.values())
    assert (run_stage(tiny_run, "--model.collisions", "reassign") / "sids.parquet").read_bytes() == sids
    _, codes, codebooks = load_sids(tiny_run, "collab")
    assert (codes >= 0).all() and [tuple(b.shape) for b in codebooks] == [(8, 4), (8, 4)]
