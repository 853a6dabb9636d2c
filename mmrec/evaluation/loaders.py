"""The registry's loaders of the baselines; the LLM heads' are in :mod:`mmrec.evaluation.llm_loaders`, apart
so that evaluating a baseline never imports the LLM stack.

Each loader reads a trained model's folder through :class:`~mmrec.artifacts.RunFolder` and builds the model
from tensors, so the models never see the run folder. Every loader has the signature
:data:`mmrec.evaluation.protocol.Loader`: ``(run_dir, checkpoint, device)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmrec.artifacts import RunFolder
from mmrec.artifacts.exports import read_exported_sasrec, read_lightning_checkpoint, read_sasrec
from mmrec.data.prepared import PreparedData
from mmrec.errors import InputError
from mmrec.models.popularity import Popularity
from mmrec.models.sasrec import SASRec


def load_popularity(run_dir: Path, checkpoint: str | None, device: torch.device) -> Popularity:
    """Count the training interactions of ``run_dir``'s prepared data."""
    if checkpoint is not None:
        raise InputError("popularity has no checkpoint: it counts the run's training interactions")
    return Popularity(PreparedData(run_dir).train_item_counts).to(device).eval()


def load_sasrec(run_dir: Path, checkpoint: str | None, device: torch.device) -> SASRec:
    """The exported model of ``<run_dir>/fit-collab``, or ``checkpoint`` when given.

    ``checkpoint`` may be a Lightning ``.ckpt`` (e.g. ``fit-collab.work/checkpoints/last.ckpt``) or a
    ``.safetensors`` file with its ``.json`` beside it. The exported model is refused unless it was trained
    on the interactions of this run's ``prepare`` stage.
    """
    if checkpoint is None:
        hparams, state, folder = read_exported_sasrec(RunFolder(run_dir))
        model, weights = SASRec.from_state(hparams, state), folder.output("sasrec")
    else:
        weights = Path(checkpoint)
        if not weights.is_file():
            raise InputError(f"{weights}: checkpoint not found")
        if weights.suffix == ".ckpt":
            model = SASRec.from_state(*read_lightning_checkpoint(weights))
        elif weights.suffix == ".safetensors":
            model = SASRec.from_state(*read_sasrec(weights.with_suffix(".json"), weights))
        else:
            raise InputError(f"{weights}: expected a Lightning .ckpt or a .safetensors file")
    model.checkpoint_path = weights
    return model.to(device).eval()
