"""The one reader of a run folder: stage names, where each stage's files live, manifests and lineage.

Everything that opens another stage's output goes through :class:`RunFolder`, so the layout of
``runs/<name>/`` (see ``docs/architecture.md``), the manifest checks and the lineage check are written here
once; models never see a path, they receive the tensors read here. The codebook file format
(``"<modality>.<level>"`` -> ``[K, D]``) is written and parsed here too, by the stages that publish it and
the readers that consume it.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmrec.artifacts.manifest import Manifest, require_same_lineage
from mmrec.artifacts.schemas import SIDS, read_table
from mmrec.artifacts.stage_output import stage_dir
from mmrec.errors import InputError


class Stage(StrEnum):
    """The stages of a run, by the name of the folder each publishes."""

    PREPARE = "prepare"
    FIT_COLLAB = "fit-collab"
    FIT_QUANTIZER = "fit-quantizer"
    ASSIGN_SIDS = "assign-sids"
    FIT_RECOMMENDER = "fit-recommender"
    FIT_RECOMMENDER_GENERATIVE = "fit-recommender-generative"
    TEST = "test"


MODALITY_STAGE = {"text": Stage.PREPARE, "image": Stage.PREPARE, "collab": Stage.FIT_COLLAB}
"""Which stage of a run directory writes each modality's ``emb_<modality>.parquet``."""
SIDS_FILES = {"sids": "sids.parquet", "codebooks": "codebooks.safetensors"}
"""The ``assign-sids`` outputs a recommender is built from, by manifest name."""


def codebook_key(modality: str, level: int) -> str:
    return f"{modality}.{level}"


def save_codebooks(books: dict[str, list[torch.Tensor]], path: Path) -> None:
    """Write per-modality codebooks (one ``[K, D]`` tensor a level) as ``codebooks.safetensors``."""
    save_file({codebook_key(m, level): book for m, levels in books.items() for level, book in enumerate(levels)}, str(path))


def load_codebooks(path: Path) -> dict[str, list[torch.Tensor]]:
    """Read ``codebooks.safetensors`` back into per-modality lists ordered by level."""
    keyed: dict[str, dict[int, torch.Tensor]] = {}
    for key, book in load_file(str(path)).items():
        modality, level = key.split(".", 1)
        keyed.setdefault(modality, {})[int(level)] = book
    return {m: [levels[level] for level in sorted(levels)] for m, levels in keyed.items()}


class StageFolder:
    """One published stage folder with its manifest; outputs are verified against it when asked for."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path, self.manifest = path, manifest
        self._verified: dict[str, Path] = {}

    def output(self, name: str) -> Path:
        """The path of output ``name``, refused when missing or changed since the manifest was written.
        Each output is hashed once per opened folder: a stage asks for the same file several times."""
        if name not in self._verified:
            self._verified[name] = self.manifest.verify_output(self.path, name)
        return self._verified[name]

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"


class RunFolder:
    """``runs/<name>/``: its stage folders, each checked against the run's prepared items when opened."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir)

    def stage_path(self, stage: Stage | str) -> Path:
        return stage_dir(self.path, str(stage))

    @cached_property
    def prepare(self) -> StageFolder:
        folder = self.stage_path(Stage.PREPARE)
        return StageFolder(folder, Manifest.read(folder))

    def open(self, stage: Stage | str, folder: str | Path | None = None, lineage: tuple[str, ...] = ("items",)) -> StageFolder:
        """Stage ``stage``'s folder (``folder`` overrides where it is), refused unless it descends from the same
        ``lineage`` inputs (the items table, by default) as this run's ``prepare``: another catalogue's outputs
        would silently index the wrong items."""
        path = Path(folder) if folder is not None else self.stage_path(stage)
        if path == self.prepare.path:
            return self.prepare
        opened = StageFolder(path, Manifest.read(path))
        for key in lineage:
            require_same_lineage(opened.manifest, opened.manifest_path, self.prepare.manifest, self.prepare.manifest_path, key)
        return opened

    def embeddings(self, modality: str) -> tuple[StageFolder, Path]:
        """The folder that publishes ``modality``'s embeddings (lineage checked) and the verified file."""
        if modality not in MODALITY_STAGE:
            raise InputError(f"unknown modality '{modality}'; expected one of {sorted(MODALITY_STAGE)}")
        folder = self.open(MODALITY_STAGE[modality])
        return folder, folder.output(f"emb_{modality}")

    def sids(
        self, modality: str, num_items: int, folder: str | Path | None = None
    ) -> tuple[StageFolder, torch.Tensor, list[torch.Tensor]]:
        """One modality's ``assign-sids`` outputs: the folder, ``codes [N, L]`` and the codebooks.

        ``codes`` is a LongTensor with one row per item of the prepared items table (``item_idx`` order), all
        ``-1`` where the item has no SID in the modality (no content there). The codebooks are the quantizer's
        ``[K_l, D]`` codebook of each quantizer level (not of a suffix level). ``folder`` overrides
        ``<run_dir>/assign-sids``.
        """
        opened = self.open(Stage.ASSIGN_SIDS, folder)
        path = opened.output("sids")
        table = read_table(path, SIDS)
        modalities = sorted(set(table.column("modality").to_pylist()))
        if modality not in modalities:
            raise InputError(f"{path}: no SIDs for modality '{modality}'; it has {', '.join(modalities) or 'none'}")
        rows = table.filter(np.asarray(table.column("modality").to_pylist()) == modality)
        item_idx = rows.column("item_idx").to_numpy()
        tuples = rows.column("codes").to_pylist()
        lengths = {len(t) for t in tuples}
        if len(lengths) != 1:
            raise InputError(f"{path}: modality '{modality}' has SIDs of different lengths {sorted(lengths)}")
        if item_idx.max() >= num_items:
            raise InputError(f"{path}: item_idx {int(item_idx.max())} beyond the {num_items} items of this run")
        codes = torch.full((num_items, lengths.pop()), -1, dtype=torch.long)
        codes[torch.from_numpy(item_idx.astype(np.int64))] = torch.tensor(tuples, dtype=torch.long)
        books_path = opened.output("codebooks")
        books = load_codebooks(books_path).get(modality, [])
        if not books:
            raise InputError(f"{books_path}: no codebooks for modality '{modality}'")
        return opened, codes, books
