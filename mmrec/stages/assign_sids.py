"""``mmrec assign-sids``: semantic IDs for every item and modality, their codebooks and a quality report.

Reads ``<run_dir>/fit-quantizer`` (``--quantizer_dir`` overrides) and the item embeddings of the
quantizer's modalities; writes ``<run_dir>/assign-sids/``: ``sids.parquet``, ``codebooks.safetensors``,
``report.json``, ``report.png`` (when matplotlib is installed) and ``manifest.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser
from torch import nn

from mmrec.artifacts import RunFolder, Stage, stage_output, write_table
from mmrec.artifacts.exports import read_quantizer
from mmrec.artifacts.manifest import file_sha256
from mmrec.artifacts.run import StageFolder, load_codebooks, save_codebooks
from mmrec.artifacts.schemas import SIDS
from mmrec.data.datamodules import ItemFeatureDataModule
from mmrec.errors import InputError
from mmrec.evaluation.sid_quality import format_table, modality_report, plot_usage, summary
from mmrec.models.mm_rqvae import MMRQVAE
from mmrec.models.sid_collisions import resolve_collisions
from mmrec.models.sid_mapper import SIDMapper, sids_table
from mmrec.stages.lightning_cli import StageCLI

STAGE = str(Stage.ASSIGN_SIDS)


def open_quantizer_folder(run_dir: str | Path, quantizer_dir: str | Path | None = None) -> tuple[StageFolder, list[str]]:
    """A ``fit-quantizer`` folder (default ``<run_dir>/fit-quantizer``) with every output's hash checked, and
    the modalities its codebooks cover; refused unless it descends from the run's prepared items table:
    codes of another catalogue would silently map items to wrong SIDs."""
    folder = RunFolder(run_dir).open(Stage.FIT_QUANTIZER, quantizer_dir)
    for name in folder.manifest.outputs:
        folder.output(name)
    return folder, sorted(load_codebooks(folder.output("codebooks")))


def load_quantizer(folder: Path) -> nn.Module:
    """The trained multimodal RQ-VAE of a ``fit-quantizer`` folder, on the CPU, in eval mode."""
    return MMRQVAE.from_state(*read_quantizer(folder))


class AssignSIDsCLI(StageCLI):
    """StageCLI with ``--quantizer_dir``, whose quantizer it links into the mapper, and whose
    ``data.modalities`` default to the quantizer's (an empty list means exactly that)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--quantizer_dir", type=str | None, default=None, help="the fit-quantizer folder to map with; default <run_dir>/fit-quantizer",
        )
        parser.link_arguments("data", "model.quantizer", compute_fn=self.quantizer, apply_on="instantiate")
        parser.set_defaults({"data.modalities": []})

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config
        self.quantizer_folder, modalities = open_quantizer_folder(config.run_dir, config.quantizer_dir)
        self.quantizer_modalities = modalities
        if not config.data.modalities:
            config.data.modalities = modalities
        elif sorted(config.data.modalities) != modalities:
            raise InputError(
                f"data.modalities is {sorted(config.data.modalities)}, but the quantizer in "
                f"{self.quantizer_folder.output('codebooks')} was trained on {modalities}; leave data.modalities "
                "empty to use the quantizer's"
            )

    def quantizer(self, data: ItemFeatureDataModule) -> nn.Module:
        """The checked folder's quantizer, refused when its branches are not the codebooks' modalities."""
        folder = self.quantizer_folder
        quantizer = load_quantizer(folder.path)
        books = self.quantizer_modalities
        if sorted(quantizer.codebooks()) != books:
            raise InputError(
                f"{folder.output('codebooks')} holds codebooks of {books}, but the quantizer of {folder.path} has "
                f"{sorted(quantizer.codebooks())}; re-run fit-quantizer"
            )
        return quantizer


def main(argv: list[str]) -> None:
    cli = AssignSIDsCLI(STAGE, SIDMapper, ItemFeatureDataModule, argv, description=__doc__.splitlines()[0])
    mapper, data = cli.model, cli.datamodule
    hp = mapper.hparams
    raw = mapper.collect(cli.trainer.predict(mapper, datamodule=data))
    resolved = {m: resolve_collisions(c.codes, hp.collisions, c.last_distances) for m, c in raw.items()}
    codebooks = mapper.codebooks()
    report = {
        m: modality_report(
            data.tables[m].matrix[raw[m].item_idx], resolved[m], [cb.numpy() for cb in codebooks[m]],
            raw[m].absent, hp.report_pairs, hp.report_seed, raw[m].latents,
        )
        for m in sorted(raw)
    }
    print(format_table(report))
    for m, r in resolved.items():
        if r.after.colliding_items:
            warnings.warn(f"{m}: {r.after.colliding_items} items share an SID (collisions: {r.applied})", stacklevel=1)
        if r.fell_back:
            warnings.warn(f"{m}: reassign found no free last-level code for some item; used suffix", stacklevel=1)

    manifest = cli.manifest()
    manifest.add_input("items", data.prepared.items_path, data.prepared.manifest)
    quantizer = cli.quantizer_folder
    for name, entry in quantizer.manifest.outputs.items():
        manifest.add_input(f"quantizer.{name}", quantizer.path / entry["file"], quantizer.manifest)
    for m, table in data.tables.items():
        manifest.add_input(f"emb_{m}", table.path, table.manifest)
    with stage_output(cli.run_dir, STAGE, manifest) as out:
        table = sids_table({m: c.item_idx for m, c in raw.items()}, resolved)
        write_table(table, out / "sids.parquet", SIDS)
        save_codebooks(codebooks, out / "codebooks.safetensors")
        (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        manifest.add_output("sids", out / "sids.parquet", rows=table.num_rows)
        manifest.add_output("codebooks", out / "codebooks.safetensors")
        manifest.add_output("report", out / "report.json")
        if plot_usage(report, out / "report.png"):
            manifest.add_output("report_png", out / "report.png")
        manifest.lineage["sids"] = file_sha256(out / "sids.parquet")
        manifest.extra = {"report": summary(report)}
    print(f"assign-sids: wrote {cli.run_dir / STAGE}")
