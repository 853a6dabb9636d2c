"""What ``mmrec test`` records and prints: ``metrics.json`` and the console table.

``metrics.json`` is self-describing on purpose: a figure copied into a paper or an issue must carry the
data it was measured on (content hashes of the items, of the catalog and of the interactions), the exact
weights (path and hash), the split and the protocol (full ranking or a top-k list, history masked or not, tie rule).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from mmrec import __version__
from mmrec.artifacts.manifest import path_sha256
from mmrec.data.prepared import PreparedData
from mmrec.evaluation.evaluate import Evaluation
from mmrec.evaluation.slices import SliceSpec, slice_metrics


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (what a timing was measured on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor() or platform.machine()


def catalog_sha256(items: pa.Table) -> str:
    """SHA-256 of the item ids in ``item_idx`` order: what each item index means. Items tables that differ in
    content alone (the text, its ``text_refined`` rewrite, image references) share it, so test folders of such
    content variants rank the same items and ``mmrec compare`` may pair them although their items hashes differ."""
    return hashlib.sha256(json.dumps(items.column("item_id").to_pylist()).encode()).hexdigest()


def dataset_summary(prepared: PreparedData) -> dict[str, Any]:
    """The prepared data a figure was measured on, identified by content hashes."""
    manifest = prepared.manifest
    return {
        "run_dir": str(prepared.run_dir.resolve()),
        "source": manifest.config.get("source"),
        "prepare_config": manifest.config,
        "num_users": prepared.num_users,
        "num_items": prepared.num_items,
        "num_interactions": prepared.interactions.num_rows,
        "items_sha256": manifest.lineage.get("items"),
        "catalog_sha256": catalog_sha256(prepared.items),
        "interactions_sha256": manifest.lineage.get("interactions"),
    }


def protocol(evaluation: Evaluation, k: list[int], mask_history: bool) -> dict[str, Any]:
    by_scores = evaluation.ranking == "scores"
    return {
        "leave_one_out": True,
        "full_ranking": True,
        "ranking": "score every item" if by_scores else "model's top-k list; targets beyond it count as rank > k",
        "mrr_cutoff": None if by_scores else max(k),
        "mask_history": mask_history,
        "ties": "pessimistic",
        "k": sorted(set(k)),
    }


def metrics_document(
    *,
    prepared: PreparedData,
    model: str,
    checkpoint: Path | None,
    split: str,
    k: list[int],
    mask_history: bool,
    evaluation: Evaluation,
    device: torch.device,
    wall_time_s: float,
    precision: str = "32",
    slices: SliceSpec | None = None,
    unrankable: dict[str, int] | None = None,
    decoding: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``metrics.json``; with ``slices``, the metrics per slice and how the slices were cut, with
    ``unrankable`` (a model that cannot rank every item) each slice's count of such targets, and with
    ``decoding`` (a beam-search model: :func:`~mmrec.evaluation.protocol.decoding_of`) how it decoded its lists."""
    sliced: dict[str, Any] = {}
    proto = protocol(evaluation, k, mask_history) | (decoding or {})
    if slices is not None:
        proto["slices"] = slices.record()
        users = evaluation.predictions.column("user_idx").to_numpy()
        sliced["slices"] = slice_metrics(slices, users, evaluation.ranks, k)
        if unrankable is not None:
            proto["slices"]["unrankable_targets"] = ("targets the model can never rank (no SID in its sid_modality), "
                                                     "counted as misses")
            for name, count in unrankable.items():
                sliced["slices"][name]["unrankable_targets"] = count
    return {
        "dataset": dataset_summary(prepared),
        "model": model,
        "checkpoint": None if checkpoint is None else {"path": str(checkpoint.resolve()), "sha256": path_sha256(checkpoint)},
        "split": split,
        "protocol": proto,
        "n_users": evaluation.n_users,
        "metrics": evaluation.metrics,
        **sliced,
        "eval_seconds": round(evaluation.seconds, 3),
        "wall_time_s": round(wall_time_s, 3),
        "device": device_name(device),
        "precision": precision,
        "mmrec_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def format_table(document: dict[str, Any]) -> str:
    """A console table of Recall@K / NDCG@K and MRR, headed by what was measured and how."""
    metrics, proto = document["metrics"], document["protocol"]
    history = "history masked" if proto["mask_history"] else "history not masked"
    lines = [
        (f"{document['model']} on {document['split']}: {document['n_users']:,} users, full ranking over "
        f"{document['dataset']['num_items']:,} items, {history}, pessimistic ties"),
        f"{'K':>4}  {'Recall':>8}  {'NDCG':>8}",
        *(f"{k:>4}  {metrics[f'recall@{k}']:>8.4f}  {metrics[f'ndcg@{k}']:>8.4f}" for k in proto["k"]),
        f"{'MRR':>4}  {metrics['mrr']:>8.4f}" + ("" if proto["mrr_cutoff"] is None else f"  (truncated at {proto['mrr_cutoff']})"),
    ]
    if "slices" in document:
        lines += ["", format_slices(document["slices"], proto["k"])]
        blocked = {name: values["unrankable_targets"] for name, values in document["slices"].items()
                   if values.get("unrankable_targets")}
        if blocked:
            lines.append("targets the model can never rank, counted as misses: "
                         + ", ".join(f"{name} {count:,}" for name, count in blocked.items()))
    return "\n".join(lines)


def format_slices(slices: dict[str, dict[str, float | int]], k: list[int]) -> str:
    """One row per slice (users, R@K and N@K for each K, MRR); a slice without users shows dashes."""
    names = [name for cutoff in k for name in (f"recall@{cutoff}", f"ndcg@{cutoff}")] + ["mrr"]
    width = max(len("slice"), *(len(slice_name) for slice_name in slices))
    labels = [name.replace("recall", "R").replace("ndcg", "N").replace("mrr", "MRR") for name in names]
    header = f"{'slice':<{width}}  {'users':>6}" + "".join(f"  {label:>7}" for label in labels)
    rows = [
        f"{slice_name:<{width}}  {values['users']:>6,}"
        + "".join(f"  {values[name]:>7.4f}" if name in values else f"  {'-':>7}" for name in names)
        for slice_name, values in slices.items()
    ]
    return "\n".join([header, *rows])
