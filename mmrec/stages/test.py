"""``mmrec test``: evaluate a trained model of the run directory on the validation or test split.

Wiring only: the model comes from :mod:`mmrec.evaluation.registry`, the loop and the metrics from
:mod:`mmrec.evaluation`; ``--devices N`` starts N processes through Lightning Fabric's launcher (one GPU
each, or CPU processes), each evaluating a shard of the users, and rank 0 writes. Writes ``metrics.json`` and ``predictions.parquet`` atomically to
``<run_dir>/test/<model>-<split>/`` (``<model>-<split>-masked/`` with ``--mask_history true``, so the two
protocols never overwrite each other; ``-beams<N>`` appended with ``--num_beams N``, ``-renorm`` or
``-no-renorm`` with ``--renormalize``) and prints a table.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from jsonargparse import auto_cli
from lightning.fabric import Fabric

from mmrec.artifacts import Manifest, stage_output, write_table
from mmrec.artifacts.schemas import PREDICTIONS, SLICE_MEMBERS
from mmrec.errors import InputError
from mmrec.evaluation.evaluate import evaluate, merge, split_loader
from mmrec.evaluation.protocol import BeamSearch, PartialCatalog, checkpoint_of, decoding_of
from mmrec.evaluation.registry import load_recommender
from mmrec.evaluation.report import format_table, metrics_document
from mmrec.evaluation.slices import DEFAULT_HISTORY_BUCKETS, DEFAULT_SHARES, SliceSpec, check_spec
from mmrec.metrics.ranking import DEFAULT_K

STAGE = "test"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def launch(devices: int, device: torch.device) -> Fabric | None:
    """``devices`` evaluation processes on ``device``'s kind through Lightning Fabric's DDP launcher (it
    re-runs this command for every other rank, locally or under torchrun/SLURM); None for one process."""
    if devices < 1:
        raise InputError(f"devices: expected at least 1, got {devices}")
    if devices == 1:
        return None
    available = torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1)
    if devices > available:
        kind = "GPUs" if device.type == "cuda" else "cores"
        raise InputError(f"devices: {devices} processes requested, this machine has {available} {kind}")
    fabric = Fabric(accelerator=device.type, devices=devices, strategy="ddp")
    fabric.launch()
    return fabric


def unrankable_targets(
    recommender: object, model: str, split: str, targets: np.ndarray, spec: SliceSpec
) -> dict[str, int] | None:
    """Per slice, the users whose target the model can never rank (an item without an SID in its
    ``sid_modality``), None for a model that ranks the whole catalog. Such targets are misses like any other
    and are counted beside the slice's figures; but a slice whose every target is one (the ``new`` slice of
    a head that writes collab SIDs) would report zero by construction, a property of the model presented as a
    measurement, and is refused."""
    if not isinstance(recommender, PartialCatalog):
        return None
    unrankable = recommender.unrankable_items().cpu().numpy()[np.asarray(targets, dtype=np.int64)]
    counts = {name: int(unrankable[members].sum()) for name, members in spec.members.items()}
    whole = [name for name, members in spec.members.items() if len(members) and counts[name] == len(members)]
    if whole:
        raise InputError(
            f"--model {model} cannot rank any {split} target of slice {', '.join(whole)} (no SID in its "
            f"sid_modality; with collab, every item never seen in training), so its figures there would be zero by "
            "construction; evaluate it without --slices, or train it with --model.init_args.sid_modality text"
        )
    return counts


def output_name(
    model: str, split: str, mask_history: bool, num_beams: int | None = None, renormalize: bool | None = None
) -> str:
    """``<model>-<split>[-masked][-beams<N>][-renorm|-no-renorm]``: a sweep of the beam search's width or scoring
    does not overwrite the model's own figures."""
    masked = "-masked" if mask_history else ""
    beams = "" if num_beams is None else f"-beams{num_beams}"
    scoring = "" if renormalize is None else ("-renorm" if renormalize else "-no-renorm")
    return f"{model}-{split}{masked}{beams}{scoring}"


def set_beam_search(recommender: object, model: str, num_beams: int | None, renormalize: bool | None) -> None:
    """Decode with ``num_beams`` beams and ``renormalize``'s scoring instead of the model's own settings (None:
    keep it); refused for a model that does not decode by beam search."""
    given = [name for name, value in (("--num_beams", num_beams), ("--renormalize", renormalize)) if value is not None]
    if not given:
        return
    if not isinstance(recommender, BeamSearch):
        raise InputError(f"{given[0]}: --model {model} does not decode by beam search (the generative head does)")
    if num_beams is not None:
        recommender.num_beams = num_beams
    if renormalize is not None:
        recommender.renormalize = renormalize


def test(
    run_dir: str = "runs/demo",
    model: str = "sasrec",
    split: Literal["valid", "test"] = "test",
    mask_history: bool = False,
    k: list[int] = list(DEFAULT_K),  # noqa: B006 (jsonargparse needs a literal default)
    batch_size: int = 1024,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    checkpoint: str | None = None,
    precision: Literal["auto", "32", "bf16"] = "auto",
    slices: bool = False,
    slice_shares: list[float] = list(DEFAULT_SHARES),  # noqa: B006 (jsonargparse needs a literal default)
    history_buckets: list[int] = list(DEFAULT_HISTORY_BUCKETS),  # noqa: B006
    devices: int = 1,
    num_beams: int | None = None,
    renormalize: bool | None = None,
) -> dict:
    """Evaluate a trained model: full-ranking Recall@K, NDCG@K and MRR on one split.

    Args:
        run_dir: run directory holding prepare/ and the model's stage folder.
        model: registered model name (popularity, sasrec, and the LLM recommenders once trained).
        split: valid (second-last item of each user) or test (last item).
        mask_history: remove the user's earlier items from the ranking (off: the TIGER protocol).
        k: cutoffs for Recall@K and NDCG@K; predictions keep the top max(k) items.
        batch_size: users per evaluation batch.
        device: auto picks cuda when available.
        checkpoint: evaluate these weights instead of the run's exported model.
        precision: ``bf16`` runs the model under bf16 autocast (scores stay float32), ``32`` as loaded;
            ``auto``: bf16 on a GPU (where the LLM heads decode several times faster), 32 on a CPU.
        slices: also report every metric per slice of the users (target popularity head/torso/tail, new
            targets, history length buckets; :mod:`mmrec.evaluation.slices`) under ``"slices"``.
        slice_shares: cumulative shares of training interactions where head ends and torso ends.
        history_buckets: lower bounds of the history length buckets (``[1, 5, 10]``: 1-4, 5-9, 10+).
        devices: processes that evaluate disjoint shards of the users (one GPU each with ``device``
            cuda, CPU processes with cpu); metrics are reduced over them and rank 0 writes the results.
        num_beams: beams of a generative model's constrained beam search (default: its trained setting, 20 in
            the shipped configs; at least max(k) are used); the results go to ``<model>-<split>-beams<N>``.
        renormalize: how a generative model scores its beams (default: its trained setting, false in the shipped
            configs): true scores each SID by its probability among the catalog's SIDs, false by the model's
            log-probability of it (:mod:`mmrec.models.llm.sid_trie`); the results go to ``...-renorm`` or
            ``...-no-renorm``.
    """
    start = time.perf_counter()
    if slices:  # a bad specification fails before the model is loaded, not after a long evaluation
        check_spec(slice_shares, history_buckets)
    if num_beams is not None and num_beams < 1:
        raise InputError(f"--num_beams must be at least 1, got {num_beams}")
    torch_device = resolve_device(device)
    fabric = launch(devices, torch_device)
    if fabric is not None:
        torch_device = fabric.device
    recommender = load_recommender(model, run_dir, checkpoint, torch_device)
    set_beam_search(recommender, model, num_beams, renormalize)
    shard = None if fabric is None else (fabric.global_rank, fabric.world_size)
    loader, data = split_loader(run_dir, split, batch_size, shard)
    prepared = data.prepared
    spec, unrankable = None, None
    if slices:
        histories, targets = prepared.histories(split)
        spec = SliceSpec.build(prepared.train_item_counts, histories, targets, slice_shares, history_buckets)
        unrankable = unrankable_targets(recommender, model, split, targets, spec)
    bf16 = precision == "bf16" or (precision == "auto" and torch_device.type == "cuda")
    evaluation = evaluate(
        recommender, loader, prepared.num_items, k, mask_history, torch_device,
        autocast_dtype=torch.bfloat16 if bf16 else None, progress=fabric is None or fabric.global_rank == 0,
    )
    if fabric is not None:
        parts: list = [None] * fabric.world_size
        dist.all_gather_object(parts, evaluation)
        evaluation = merge(parts)
    document = metrics_document(
        prepared=prepared, model=model, checkpoint=checkpoint_of(recommender), split=split, k=k,
        mask_history=mask_history, evaluation=evaluation, device=torch_device, wall_time_s=time.perf_counter() - start,
        precision="bf16" if bf16 else "32", slices=spec, unrankable=unrankable,
        decoding=decoding_of(recommender, max(k)),
    )
    if fabric is not None and fabric.global_rank != 0:  # rank 0 writes
        return document
    manifest = Manifest(
        stage=STAGE,
        config={"run_dir": run_dir, "model": model, "split": split, "mask_history": mask_history, "k": k,
                "batch_size": batch_size, "device": device, "checkpoint": checkpoint,
                "precision": "bf16" if bf16 else "32", "slices": slices, "slice_shares": slice_shares,
                "history_buckets": history_buckets, "devices": devices, "num_beams": num_beams,
                "renormalize": renormalize},
        extra={"metrics": evaluation.metrics},
    )
    manifest.add_input("interactions", prepared.interactions_path, prepared.manifest)
    source = checkpoint_of(recommender)
    if source is not None and source.is_file():
        manifest.add_input("checkpoint", source)
    name = output_name(model, split, mask_history, num_beams, renormalize)
    with stage_output(Path(run_dir) / STAGE, name, manifest) as out:
        (out / "metrics.json").write_text(json.dumps(document, indent=2) + "\n")
        write_table(evaluation.predictions, out / "predictions.parquet", PREDICTIONS)
        manifest.add_output("metrics", out / "metrics.json")
        manifest.add_output("predictions", out / "predictions.parquet", rows=evaluation.n_users)
        if spec is not None:  # for `mmrec compare --slices true`: which users each slice holds
            members = pa.table(spec.membership(evaluation.predictions.column("user_idx").to_numpy()))
            write_table(members, out / "slices.parquet", SLICE_MEMBERS)
            manifest.add_output("slices", out / "slices.parquet", rows=members.num_rows)
    print(format_table(document))
    print(f"wrote {Path(run_dir) / STAGE / name} ({document['wall_time_s']:.1f} s)")
    return document


def main(argv: list[str]) -> None:
    auto_cli(test, args=argv, as_positional=False, prog="mmrec test")
