"""The SID mapper: a trained quantizer's code tuple for every item and modality.

``SIDMapper`` is a predict-only LightningModule over ``ItemFeatureDataModule`` batches, so mapping runs
on whatever accelerator the Trainer is given and in batches of any size. It only *predicts*; collisions
are resolved afterwards over the whole table (:mod:`mmrec.models.sid_collisions`), because whether two
items collide is not known inside one batch.

Items without content in a modality (``present`` False) get no SID there: they have no row in
``sids.parquet`` for that modality, and recommenders mask them (``SIDEmbedding`` embeds them as zeros).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import numpy as np
import pyarrow as pa
import torch
from torch import nn

from mmrec.artifacts.schemas import SIDS
from mmrec.errors import InputError
from mmrec.models.sid_collisions import RESOLUTIONS, ResolvedCodes

LEVEL_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class ModalityCodes:
    """The raw (unresolved) codes of one modality, for the items that have content there."""

    item_idx: np.ndarray
    """``[n]`` ascending."""
    codes: np.ndarray
    """``[n, L]`` int64."""
    last_distances: np.ndarray | None
    """``[n, K]``: squared distances of each last-level residual to every last-level code (``reassign``)."""
    latents: np.ndarray
    """``[n, D]``: the encoder's output that the codes quantize (splits the report's distance figure)."""
    absent: int
    """Items with no content in this modality, hence no SID."""


class SIDMapper(L.LightningModule):
    """Map items to the code tuples of a trained quantizer (predict only).

    Args:
        quantizer: the trained multimodal RQ-VAE (``assign-sids`` links in the one its ``--quantizer_dir``
            names); it is frozen here.
        collisions: ``suffix`` (TIGER), ``reassign`` (LC-Rec) or ``none``; see ``mmrec.models.sid_collisions``.
        report_pairs: item pairs sampled for the Kendall-tau distance-preservation figure.
        report_seed: seed of those pairs and of the random-code baseline (fixed, so reports are reproducible).
    """

    def __init__(
        self,
        quantizer: nn.Module,
        collisions: Literal["suffix", "reassign", "none"] = "suffix",
        report_pairs: int = 10_000,
        report_seed: int = 0,
    ) -> None:
        super().__init__()
        if collisions not in RESOLUTIONS:
            raise InputError(f"model.collisions must be one of {', '.join(RESOLUTIONS)}, got {collisions!r}")
        if report_pairs < 1:
            raise InputError(f"model.report_pairs must be positive, got {report_pairs}")
        self.save_hyperparameters(ignore=["quantizer"])
        self.quantizer = quantizer.eval().requires_grad_(False)
        self.modalities = list(self.quantizer.codebooks())

    @property
    def wants_distances(self) -> bool:
        return self.hparams.collisions == "reassign"

    def codebooks(self) -> dict[str, list[torch.Tensor]]:
        """Per modality, the ``[K, D]`` codebook of each quantizer level (CPU, float32)."""
        books = self.quantizer.codebooks()
        return {m: [cb.detach().float().cpu().contiguous() for cb in levels] for m, levels in books.items()}

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        out = self.quantizer.quantize(batch, return_distances=self.wants_distances)
        latents = self.quantizer.encode(batch)
        result = {"item_idx": batch["item_idx"]}
        for m in self.modalities:
            result[m] = out[m]
            result[f"{m}_present"] = batch[f"{m}_present"]
            result[f"{m}_latent"] = latents[m]
            if self.wants_distances:
                result[f"{m}_last_distances"] = out[f"{m}_last_distances"]
        return result

    def collect(self, predictions: list[dict[str, torch.Tensor]]) -> dict[str, ModalityCodes]:
        """Concatenate ``trainer.predict`` batches into per-modality codes of the items with content."""
        def cat(key: str) -> np.ndarray:
            return torch.cat([p[key].detach().cpu() for p in predictions]).numpy()

        item_idx = cat("item_idx")
        order = np.argsort(item_idx, kind="stable")
        result = {}
        for m in self.modalities:
            present = cat(f"{m}_present")[order].astype(bool)
            distances = cat(f"{m}_last_distances")[order][present] if self.wants_distances else None
            result[m] = ModalityCodes(
                item_idx=item_idx[order][present],
                codes=cat(m)[order][present].astype(np.int64),
                last_distances=distances,
                latents=cat(f"{m}_latent")[order][present].astype(np.float32),
                absent=int((~present).sum()),
            )
        return result


def sid_string(codes: list[int]) -> str:
    """``[12, 7, 201, 3]`` -> ``<a_12><b_7><c_201><d_3>``: one letter a level, a suffix level included."""
    if len(codes) > len(LEVEL_LETTERS):
        raise ValueError(f"SIDs of {len(codes)} levels; token strings name at most {len(LEVEL_LETTERS)}")
    return "".join(f"<{LEVEL_LETTERS[level]}_{code}>" for level, code in enumerate(codes))


def sids_table(item_idx: dict[str, np.ndarray], resolved: dict[str, ResolvedCodes]) -> pa.Table:
    """The ``sids.parquet`` table, rows sorted by (modality, item_idx) so equal inputs give equal bytes."""
    columns: dict[str, list[Any]] = {"item_idx": [], "modality": [], "codes": [], "sid": []}
    for modality in sorted(resolved):
        order = np.argsort(item_idx[modality], kind="stable")
        for item, codes in zip(item_idx[modality][order].tolist(), resolved[modality].codes[order].tolist()):
            columns["item_idx"].append(item)
            columns["modality"].append(modality)
            columns["codes"].append(codes)
            columns["sid"].append(sid_string(codes))
    return pa.table(columns, schema=SIDS)
