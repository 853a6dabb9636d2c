"""Writers and readers of the exported models: ``fit-collab``'s SASRec, ``fit-quantizer``'s MM-RQ-VAE and
``fit-recommender``'s LLM heads.

The models never see a path: they hand out their hyperparameters and tensors (``spec()``, state dicts) and
are rebuilt from them (``from_state``). The file names and formats live here, once, beside the run-folder
reader. The functions only call the models' public methods, and import the model classes for type hints
alone, so ``mmrec.artifacts`` stays the package that every other one may import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmrec.artifacts.run import RunFolder, Stage, StageFolder
from mmrec.artifacts.schemas import embeddings_schema, embeddings_table, write_table
from mmrec.errors import InputError

if TYPE_CHECKING:
    from mmrec.models.llm.base import LLMRecommenderBase
    from mmrec.models.mm_rqvae import MMRQVAE
    from mmrec.models.sasrec import SASRec

SASREC_WEIGHTS, SASREC_CONFIG, EMBEDDINGS = "sasrec.safetensors", "sasrec.json", "emb_collab.parquet"
SASREC_FORMAT = "mmrec.sasrec/1"
QUANTIZER_JSON, QUANTIZER_WEIGHTS = "quantizer.json", "quantizer.safetensors"
QUANTIZER_FORMAT = "mmrec.mm_rqvae/1"
SPEC_FILE, HEADS_FILE, ADAPTER_DIR, BACKBONE_DIR = "recommender.json", "heads.safetensors", "adapter", "backbone"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""peft's file name for the adapter's tensors inside ``adapter/`` (``save_pretrained`` writes it)."""

Hyperparameters = dict[str, Any]
State = dict[str, Tensor]


def _cpu(state: State) -> State:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


# ---- SASRec (fit-collab) ---------------------------------------------------------------------------

def save_sasrec(model: SASRec, folder: Path, trained: np.ndarray) -> dict[str, Path]:
    """Write weights (safetensors), the hyperparameters that rebuild the model, and ``emb_collab.parquet``;
    return them by manifest name. ``trained [N]`` marks the items that occur in training: the others (new
    items of the new-item protocol) keep their random initial rows, which carry no collaborative signal, so
    ``emb_collab.parquet`` marks them absent and later stages treat them as items without that modality."""
    save_file(_cpu(model.state_dict()), str(folder / SASREC_WEIGHTS))
    config = {"format": SASREC_FORMAT, "hyperparameters": model.spec()}
    (folder / SASREC_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    table = model.item_embeddings()
    present = np.asarray(trained, dtype=bool)
    write_table(embeddings_table(np.where(present[:, None], table, 0), present), folder / EMBEDDINGS, embeddings_schema(table.shape[1]))
    return {"sasrec": folder / SASREC_WEIGHTS, "sasrec_config": folder / SASREC_CONFIG, "emb_collab": folder / EMBEDDINGS}


def read_sasrec(config: Path, weights: Path) -> tuple[Hyperparameters, State]:
    """The hyperparameters of ``sasrec.json`` and the tensors of a safetensors state dict
    (``SASRec.from_state`` rebuilds the model)."""
    try:
        spec = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{config}: not a readable SASRec config ({exc})") from None
    if spec.get("format") != SASREC_FORMAT:
        raise InputError(f"{config}: expected format {SASREC_FORMAT}, found {spec.get('format')}")
    return spec["hyperparameters"], load_file(str(weights))


def read_exported_sasrec(run: RunFolder) -> tuple[Hyperparameters, State, StageFolder]:
    """The SASRec ``fit-collab`` exported into ``run``, refused unless it was trained on the run's items and
    interactions (so its item index is the prepared table's): hyperparameters, tensors, and its folder."""
    folder = run.open(Stage.FIT_COLLAB, lineage=("items", "interactions"))
    return (*read_sasrec(folder.output("sasrec_config"), folder.output("sasrec")), folder)


def read_lightning_checkpoint(path: Path) -> tuple[Hyperparameters, State]:
    """The hyperparameters and state dict of a Lightning checkpoint (tensors only: no pickle is run)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch raises several types for a corrupt or foreign file)
        raise InputError(f"{path}: not a readable Lightning checkpoint ({exc})") from None
    return checkpoint["hyper_parameters"], checkpoint["state_dict"]


# ---- MM-RQ-VAE (fit-quantizer) ---------------------------------------------------------------------

def save_quantizer(model: MMRQVAE, folder: Path) -> tuple[Path, Path]:
    """Write ``quantizer.json`` (hyperparameters) and ``quantizer.safetensors`` (weights) into ``folder``."""
    config, weights = folder / QUANTIZER_JSON, folder / QUANTIZER_WEIGHTS
    config.write_text(json.dumps({"format": QUANTIZER_FORMAT, "hparams": model.spec()}, indent=2, sort_keys=True) + "\n")
    save_file(_cpu(model.state_dict()), str(weights))
    return config, weights


def read_quantizer(folder: Path) -> tuple[Hyperparameters, State]:
    """The hyperparameters and CPU tensors of a stage folder holding ``quantizer.json`` and
    ``quantizer.safetensors`` (``MMRQVAE.from_state`` rebuilds the model)."""
    config_path, weights_path = folder / QUANTIZER_JSON, folder / QUANTIZER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise InputError(f"{path}: not found; run `mmrec fit-quantizer` first")
    config = json.loads(config_path.read_text())
    if config.get("format") != QUANTIZER_FORMAT:
        raise InputError(f"{config_path}: format {config.get('format')!r}, this mmrec reads {QUANTIZER_FORMAT!r}")
    return config["hparams"], load_file(str(weights_path), device="cpu")


# ---- LLM recommenders (fit-recommender) ------------------------------------------------------------

def save_llm_export(model: LLMRecommenderBase, folder: Path, trained: State | None = None) -> dict[str, Path]:
    """Write adapter, heads, spec (and a ``tiny`` backbone) into ``folder``; return them by manifest name.

    ``trained``: the model's full state dict (``Strategy.lightning_module_state_dict()``), needed where the
    live parameters are shards of it (FSDP); None reads the live parameters.
    """
    files = {}
    if isinstance(model.lm, PeftModel):  # what peft's save_pretrained writes, from model.adapter_state
        adapter = folder / ADAPTER_DIR
        adapter.mkdir(parents=True, exist_ok=True)
        model.lm.peft_config[model.lm.active_adapter].save_pretrained(str(adapter))
        save_file(model.adapter_state(trained), str(adapter / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        files[ADAPTER_DIR] = adapter
    save_file(model.heads_state(trained), str(folder / HEADS_FILE))
    files["heads"] = folder / HEADS_FILE
    backbone = model.standalone_backbone(trained)
    if backbone is not None:  # a random backbone exists nowhere else: saved (a few hundred KB) for the reload
        backbone.save_pretrained(str(folder / BACKBONE_DIR))
        model.tokenizer.save_pretrained(str(folder / BACKBONE_DIR))
        files[BACKBONE_DIR] = folder / BACKBONE_DIR
    (folder / SPEC_FILE).write_text(json.dumps(model.spec(trained), indent=2) + "\n")
    files["recommender"] = folder / SPEC_FILE
    return files


def load_llm_export(model: LLMRecommenderBase, folder: Path) -> None:
    """Load the adapter and heads that :func:`save_llm_export` wrote into a model built from its spec."""
    if isinstance(model.lm, PeftModel):
        path = folder / ADAPTER_DIR / ADAPTER_WEIGHTS
        if not path.is_file():
            raise InputError(f"{path}: adapter weights not found")
        mismatched = model.load_adapter_state(load_file(str(path)))
        if mismatched:
            raise InputError(f"{path}: does not match the adapter in {SPEC_FILE} (e.g. {mismatched[0]})")
    heads = load_file(str(folder / HEADS_FILE))
    expected = set(model.heads_state())
    if set(heads) != expected:
        odd = min(set(heads) ^ expected)
        raise InputError(f"{folder / HEADS_FILE}: does not match {folder / SPEC_FILE} (tensor '{odd}')")
    model.load_state_dict(heads, strict=False)


def load_llm_checkpoint(model: LLMRecommenderBase, path: Path) -> None:
    """Load the trained tensors of a ``fit-recommender`` Lightning checkpoint, refusing one that lacks any."""
    _, state = read_lightning_checkpoint(path)
    missing = model.trainable_names() - set(state)
    if missing:
        raise InputError(f"{path}: lacks trained tensors of this model (e.g. {min(missing)})")
    model.load_state_dict(state, strict=False)
