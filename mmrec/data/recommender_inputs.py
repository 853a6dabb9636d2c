"""What an LLM recommender is built from, as tensors: item embeddings, SIDs with their codebooks, training
item counts, item texts and, to distil from, the trained SASRec.

The models take a :class:`RecommenderInputs` and never a path, so they can be built in a notebook from
tensors as well as by a stage from a run folder (:func:`load_recommender_inputs`). A model says which
inputs it needs (:class:`InputNeeds`), so a stage reads, checks and records only those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmrec.artifacts import Manifest, Stage
from mmrec.artifacts.exports import read_exported_sasrec
from mmrec.data.prepared import PreparedData, load_modality, load_sids
from mmrec.errors import InputError
from mmrec.models.sasrec import SASRec


@dataclass(frozen=True)
class ItemEmbeddings:
    """One modality's item vectors: ``matrix [N, d]`` float32, ``present [N]`` bool (the explicit mask)."""

    matrix: Tensor
    present: Tensor


@dataclass(frozen=True)
class SIDCodes:
    """One modality's semantic IDs: ``codes [N, L]`` long (-1 rows: no SID) and the quantizer's ``[K, D]``
    codebook of each quantizer level (a suffix level has none)."""

    codes: Tensor
    codebooks: list[Tensor]
    source: str = "the SIDs"
    """What the codes are called in error messages (their file, when read from a run)."""


class RecommenderInputs:
    """Everything about the catalog that an LLM recommender is built from.

    A plain class, not a dataclass: LightningCLI would expand a dataclass argument into command-line options,
    and these tensors reach the model only through the ``fit-recommender`` link, never from a config.

    Args:
        train_item_counts: ``[N]`` training interactions per item (frequency-aware fusion); its length is the
            catalog size.
        embeddings: raw item vectors by modality.
        sids: semantic IDs with their codebooks by modality.
        item_texts: each item's text (``""`` where it has none), for heads that read titles.
        teacher: the trained SASRec whose ranking a head distils while it trains (training only: a head is
            rebuilt for evaluation without it).
    """

    def __init__(
        self, train_item_counts: Tensor, embeddings: dict[str, ItemEmbeddings] | None = None,
        sids: dict[str, SIDCodes] | None = None, item_texts: list[str] | None = None,
        teacher: SASRec | None = None,
    ) -> None:
        self.train_item_counts = train_item_counts
        self.embeddings = dict(embeddings or {})
        self.sids = dict(sids or {})
        self.item_texts = item_texts
        self.teacher = teacher

    @property
    def num_items(self) -> int:
        return len(self.train_item_counts)


@dataclass(frozen=True)
class InputNeeds:
    """Which inputs a model reads: raw embeddings and SIDs by modality, whether item texts, and whether the
    trained SASRec of ``fit-collab`` as a teacher."""

    modalities: tuple[str, ...] = ()
    sid_modalities: tuple[str, ...] = ()
    item_texts: bool = False
    teacher: bool = False


@dataclass(frozen=True)
class InputSource:
    """Where a loaded input came from, for the manifest of the stage that trains on it."""

    path: Path
    manifest: Manifest


def load_recommender_inputs(
    prepared: PreparedData, needs: InputNeeds
) -> tuple[RecommenderInputs, dict[str, InputSource]]:
    """Read what ``needs`` names from the run folder, each file checked against the prepared items, and the
    files it came from by manifest input name (``emb_<modality>``, ``sids``, ``codebooks``, ``teacher``)."""
    sources: dict[str, InputSource] = {}
    embeddings = {}
    for name in needs.modalities:
        table = load_modality(prepared.run_dir, name, prepared)
        embeddings[name] = ItemEmbeddings(torch.from_numpy(table.matrix), torch.from_numpy(table.present))
        sources[f"emb_{name}"] = InputSource(table.path, table.manifest)
    sids = {}
    for name in needs.sid_modalities:
        folder, codes, codebooks = load_sids(prepared.run_dir, name, prepared=prepared)
        sids[name] = SIDCodes(codes, codebooks, str(folder.output("sids")))
        for key in ("sids", "codebooks"):
            sources[key] = InputSource(folder.output(key), folder.manifest)
    texts = [text or "" for text in prepared.items.column("text").to_pylist()] if needs.item_texts else None
    teacher = None
    if needs.teacher:
        teacher, sources["teacher"] = load_teacher(prepared)
    counts = torch.from_numpy(prepared.train_item_counts)
    return RecommenderInputs(counts, embeddings, sids, texts, teacher), sources


def load_teacher(prepared: PreparedData) -> tuple[SASRec, InputSource]:
    """The SASRec that ``fit-collab`` exported into the run folder and its weights file (the model freezes it).

    Refused unless it was trained on this run's items and interactions (the same lineage check as ``mmrec
    test --model sasrec``): its item index is then the prepared items table's, which the recommender shares,
    and it has seen no interaction of the validation or test split.
    """
    try:
        hparams, state, folder = read_exported_sasrec(prepared.run)
    except InputError as exc:  # no fit-collab/ or no SASRec in it (a lineage refusal passes as it is)
        path = prepared.run.stage_path(Stage.FIT_COLLAB)
        raise InputError(
            f"{path}: no exported SASRec to distil from (model.distill_weight > 0); run `mmrec fit-collab` first "
            f"or set model.distill_weight 0 ({exc})"
        ) from None
    return SASRec.from_state(hparams, state), InputSource(folder.output("sasrec"), folder.manifest)
