"""What a model must offer for ``mmrec test`` to evaluate it.

One of two methods, whichever the model can do:

- :class:`Recommender` (``score_batch``): a score for every item of the catalog. This is the exact full
  ranking, and the evaluator prefers it when a model has both methods.
- :class:`TopKRecommender` (``topk_batch``): only a ranked list, for models that decode items rather than
  score them (a generative semantic-ID decoder with beam search). A target missing from the list counts
  as rank > k, so its MRR is truncated at the list length; ``metrics.json`` says so.

The batch a model receives is the one ``SequenceDataModule`` collates for evaluation, with the user's
**complete** history: ``user_idx [B]``, ``history [B, L]`` (left-padded with 0, most recent item at
``-1``), ``mask [B, L]`` (True on real items; item 0 is a real item wherever ``mask`` is True) and
``target [B]``. A model keeps the most recent items it can read (``history[:, -max_len:]``) and must not
look at ``target``. Tensors are already on the model's device.

Scores should be float32: bf16 or fp16 scores tie often, and ties are ranked pessimistically (see
:mod:`mmrec.metrics.ranking`). The evaluator never modifies the returned tensor in place, so a model
may return a broadcast view (popularity does).

Optionally, a model has an attribute ``checkpoint_path: Path | None`` naming the file or folder its
weights were loaded from; ``metrics.json`` records that path and its content hash.

A loader (see :mod:`mmrec.evaluation.registry`) builds the model from a run directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Recommender(Protocol):
    """A model that scores the whole catalog for each user of a batch."""

    def score_batch(self, batch: dict[str, Tensor]) -> Tensor:
        """Return ``[B, num_items]`` float scores, higher is better."""
        ...


@runtime_checkable
class TopKRecommender(Protocol):
    """A model that returns only its best ``k`` items for each user of a batch."""

    def topk_batch(self, batch: dict[str, Tensor], k: int) -> tuple[Tensor, Tensor]:
        """Return ``(items LongTensor [B, k], scores FloatTensor [B, k])``, best first; -1 marks an empty slot."""
        ...


AnyRecommender = Recommender | TopKRecommender


@runtime_checkable
class PartialCatalog(Protocol):
    """A model that can never rank some items (the generative head cannot write an item without an SID)."""

    def unrankable_items(self) -> Tensor:
        """``[num_items]`` bool: True for every item the model can never put in a ranking."""
        ...


@runtime_checkable
class BeamSearch(Protocol):
    """A model that decodes its list by beam search, whose width ``mmrec test --num_beams`` and scoring
    ``mmrec test --renormalize`` may change."""

    num_beams: int
    renormalize: bool

    def beam_width(self, k: int) -> int:
        """The beams a list of ``k`` items is decoded with."""
        ...


Loader = Callable[[Path, str | None, torch.device], AnyRecommender]
"""``loader(run_dir, checkpoint, device)``: build a trained model from ``run_dir`` (or from ``checkpoint``
when given, overriding the run's default weights), on ``device`` and in evaluation mode."""


def decoding_of(model: object, k: int) -> dict[str, int | bool] | None:
    """How a beam-search model decodes a list of ``k`` items (``num_beams``, ``renormalize``), for
    ``metrics.json``'s protocol; None for a model that scores items."""
    if not isinstance(model, BeamSearch):
        return None
    return {"num_beams": model.beam_width(k), "renormalize": model.renormalize}


def checkpoint_of(model: AnyRecommender) -> Path | None:
    """The file or folder the model's weights came from, when the model says so."""
    path = getattr(model, "checkpoint_path", None)
    return Path(path) if path is not None else None
