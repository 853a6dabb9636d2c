"""The registry's loaders of the LLM heads: the run's catalog tensors and the head's export, read through
:class:`~mmrec.artifacts.RunFolder`, make the model (see :mod:`mmrec.evaluation.loaders`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from mmrec.artifacts import RunFolder, Stage
from mmrec.artifacts.exports import ADAPTER_DIR, BACKBONE_DIR, HEADS_FILE, load_llm_checkpoint, load_llm_export
from mmrec.artifacts.manifest import file_sha256
from mmrec.artifacts.run import MODALITY_STAGE, SIDS_FILES, StageFolder
from mmrec.data.prepared import PreparedData
from mmrec.data.recommender_inputs import load_recommender_inputs
from mmrec.errors import InputError, LineageError
from mmrec.models.llm.backbone import TINY, BackboneSpec, load_backbone
from mmrec.models.llm.base import SPEC_FORMAT, LLMRecommenderBase
from mmrec.models.llm.generative import GenerativeRecommender
from mmrec.models.llm.lora import LoRASpec
from mmrec.models.llm.prompt import PromptSpec
from mmrec.models.llm.recommender import LLMRecommender

READABLE_SPECS = ("mmrec.llm-recommender/1", SPEC_FORMAT)
"""``recommender.json`` formats this version reads: /1 kept ``num_items`` among the hyperparameters."""


def load_fusion(run_dir: Path, checkpoint: str | None, device: torch.device) -> LLMRecommender:
    """``mmrec test --model fusion`` (see :func:`load_llm`)."""
    return load_llm(LLMRecommender, run_dir, checkpoint, device)


def load_generative(run_dir: Path, checkpoint: str | None, device: torch.device) -> GenerativeRecommender:
    """``mmrec test --model generative`` (see :func:`load_llm`)."""
    return load_llm(GenerativeRecommender, run_dir, checkpoint, device)


def require_same_inputs(export: StageFolder, run: RunFolder) -> None:
    """Refuse to rebuild a model whose embeddings or SIDs in the run changed since it was trained (a
    re-run ``fit-collab``, say): the frozen tables are read from the run, not stored with the model."""
    current = {f"emb_{m}": run.stage_path(stage) / f"emb_{m}.parquet" for m, stage in MODALITY_STAGE.items()}
    current.update({key: run.stage_path(Stage.ASSIGN_SIDS) / name for key, name in SIDS_FILES.items()})
    for name, entry in export.manifest.inputs.items():
        path = current.get(name)
        if path is not None and (not path.is_file() or file_sha256(path) != entry["sha256"]):
            raise LineageError(
                f"{path}: differs from the '{name}' that {export.manifest_path} records as trained on; "
                "re-run fit-recommender"
            )


def load_llm(
    cls: type[LLMRecommenderBase], run_dir: Path, checkpoint: str | None, device: torch.device
) -> LLMRecommenderBase:
    """Rebuild a trained LLM head ``cls`` from the run's tensors and its export.

    ``checkpoint``: None reads ``<run_dir>/<cls.export_folder>/``; a folder reads another export; a ``.ckpt``
    file (a Lightning checkpoint of ``fit-recommender``) loads its trained tensors into the model that
    ``<run_dir>/<cls.export_folder>/recommender.json`` describes.
    """
    folder, ckpt = None, None
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_dir():
            folder = path
        elif path.is_file() and path.suffix == ".ckpt":
            ckpt = path
        else:
            raise InputError(f"{path}: expected a fit-recommender folder or a Lightning .ckpt file")
    run = RunFolder(run_dir)
    export = run.open(cls.export_folder, folder)
    require_same_inputs(export, run)
    spec_path = export.output("recommender")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") not in READABLE_SPECS:
        raise InputError(f"{spec_path}: format {spec.get('format')!r}; this mmrec reads {', '.join(READABLE_SPECS)}")
    head = spec.get("head", "fusion")
    if head != cls.head:
        raise InputError(f"{spec_path}: the model has the '{head}' head; evaluate it with --model {head}")
    hparams = dict(spec["hparams"])
    num_items = spec.get("num_items", hparams.pop("num_items", None))
    prepared = PreparedData(run_dir)
    if num_items != prepared.num_items:
        raise InputError(f"{spec_path}: the model was trained on {num_items} items, but {prepared.items_path} has {prepared.num_items}")
    backbone = replace(BackboneSpec(**hparams.pop("backbone")), compile=False)  # evaluation runs eagerly
    if backbone.name_or_path == TINY:
        backbone = replace(backbone, name_or_path=str(export.path / BACKBONE_DIR))
    needs = replace(cls.input_needs(hparams), teacher=False)  # a distillation teacher only trains: scores come from the LLM
    inputs, _ = load_recommender_inputs(prepared, needs)
    model = cls(
        inputs=inputs, backbone=load_backbone(backbone), lora=LoRASpec(**hparams.pop("lora")),
        prompt=PromptSpec(**hparams.pop("prompt")), **hparams,
    )
    if ckpt is not None:
        load_llm_checkpoint(model, ckpt)
        model.checkpoint_path = ckpt
    else:
        export.output("heads")
        for name in (ADAPTER_DIR, BACKBONE_DIR):  # recorded where the model has them (LoRA; a tiny backbone)
            if name in export.manifest.outputs:
                export.output(name)
        load_llm_export(model, export.path)
        model.checkpoint_path = export.path / HEADS_FILE
    return model.to(device).eval()
