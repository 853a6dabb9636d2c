"""``mmrec assign-sids``: semantic IDs for every item and modality, their codebooks and a quality report.

Reads ``<run_dir>/fit-quantizer`` (``--model.quantizer_dir`` overrides) and the item embeddings of the
quantizer's modalities; writes ``<run_dir>/assign-sids/``: ``sids.parquet``, ``codebooks.safetensors``,
``report.json``, ``report.png`` (when matplotlib is installed) and ``manifest.json``.
"""

from __future__ import annotations

import json
import warnings

from safetensors.torch import save_file

from mmrec.artifacts import stage_output, write_table
from mmrec.artifacts.manifest import file_sha256
from mmrec.artifacts.schemas import SIDS
from mmrec.data.datamodules import ItemFeatureDataModule
from mmrec.errors import InputError
from mmrec.evaluation.sid_quality import format_table, modality_report, plot_usage, summary
from mmrec.models.sid_collisions import resolve_collisions
from mmrec.models.sid_mapper import SIDMapper, open_quantizer_folder, sids_table
from mmrec.stages.lightning_cli import StageCLI

STAGE = "assign-sids"


class AssignSIDsCLI(StageCLI):
    """StageCLI whose ``data.modalities`` default to the quantizer's (an empty list means exactly that)."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("run_dir", "model.run_dir")
        parser.set_defaults({"data.modalities": []})

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config
        folder = open_quantizer_folder(config.run_dir, config.model.quantizer_dir)
        if not config.data.modalities:
            config.data.modalities = folder.modalities
        elif sorted(config.data.modalities) != folder.modalities:
            raise InputError(
                f"data.modalities is {sorted(config.data.modalities)}, but the quantizer in {folder.codebooks_path} "
                f"was trained on {folder.modalities}; leave data.modalities empty to use the quantizer's"
            )


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
    for name, entry in mapper.folder.manifest.outputs.items():
        manifest.add_input(f"quantizer.{name}", mapper.folder.path / entry["file"], mapper.folder.manifest)
    for m, table in data.tables.items():
        manifest.add_input(f"emb_{m}", table.path, table.manifest)
    with stage_output(cli.run_dir, STAGE, manifest) as out:
        table = sids_table({m: c.item_idx for m, c in raw.items()}, resolved)
        write_table(table, out / "sids.parquet", SIDS)
        save_file({f"{m}.{level}": cb for m, books in codebooks.items() for level, cb in enumerate(books)},
                  str(out / "codebooks.safetensors"))
        (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        manifest.add_output("sids", out / "sids.parquet", rows=table.num_rows)
        manifest.add_output("codebooks", out / "codebooks.safetensors")
        manifest.add_output("report", out / "report.json")
        if plot_usage(report, out / "report.png"):
            manifest.add_output("report_png", out / "report.png")
        manifest.lineage["sids"] = file_sha256(out / "sids.parquet")
        manifest.extra = {"report": summary(report)}
    print(f"assign-sids: wrote {cli.run_dir / STAGE}")
