"""Paired significance between ``mmrec test`` folders: is a difference between two models more than noise?

Both models ranked the same held-out item of the same users, so the comparison is **paired**: per-user
Recall@K and NDCG@K are recomputed from each folder's ``predictions.parquet`` and the per-user differences
are tested (paired bootstrap confidence interval of the mean difference, paired t-test, Wilcoxon
signed-rank test). Comparing two metric averages without pairing would throw away that the users are
shared and need far larger gaps to reach the same confidence.

The per-user values come from the rule of :mod:`mmrec.metrics.ranking` (pessimistic rank of the target in
the listed top items; a target outside the list earns 0), and their means must equal the folder's
``metrics.json``: a folder whose predictions do not reproduce its own figures is refused rather than tested.
Several seeds of one model are several folders; a side of several folders is tested on the per-user metric
averaged over its seeds, and each seed's mean is reported as well.

With ``slices``, the same tests run within each slice of ``mmrec test --slices true`` (the users of its
``slices.parquet``: target popularity head / torso / tail, new targets, history-length buckets), which must
hold the same users in every folder: whether a model's gain on the tail or on new items is more than noise.

Folders must come from the same data: the same interactions, and the same items table or, where the items
tables differ in content alone (a text ablation: ``prepare --text.refine.enabled true``, another text
template), the same catalog (``catalog_sha256``, the item ids in index order), since the content is a model
input like any other while the catalog fixes what each ranked item and target is.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from mmrec.artifacts.schemas import PREDICTIONS, SLICE_MEMBERS, read_table
from mmrec.errors import InputError
from mmrec.metrics.ranking import list_ranks

TOLERANCE = 1e-9
"""How far a recomputed mean may be from ``metrics.json`` (float64 sums in another order, nothing more)."""

PROTOCOL_KEYS = ("leave_one_out", "full_ranking", "mask_history", "ties", "k")
"""Protocol fields that must agree. ``ranking`` and ``mrr_cutoff`` may differ: a scoring model and a list
model (the generative head) are compared on Recall/NDCG@K, which both measure the same way up to K."""

DATASET_KEYS = ("items_sha256", "catalog_sha256", "interactions_sha256")
"""What the result records of the data; ``catalog_sha256`` is None for folders written before it was recorded."""

BOOTSTRAP_BLOCK = 1 << 22
"""Resampled user indices drawn at once (32 MiB): Beauty's 22k users x 10,000 resamples would need 1.8 GB."""


@dataclass(frozen=True)
class TestFolder:
    """One ``mmrec test`` output: its ``metrics.json`` and each user's target rank (``inf``: not listed)."""

    path: Path
    document: dict[str, Any]
    users: np.ndarray
    targets: np.ndarray
    ranks: np.ndarray

    def slice_members(self) -> dict[str, np.ndarray]:
        """``{slice: sorted user_idx}`` from ``slices.parquet``, in the order the slices were written."""
        path = self.path / "slices.parquet"
        if not path.is_file():
            raise InputError(f"{self.path}: no slices.parquet; test with `mmrec test --slices true` to compare by slice")
        table = read_table(path, SLICE_MEMBERS)
        names = table.column("slice").to_numpy(zero_copy_only=False)
        users = table.column("user_idx").to_numpy()
        return {name: np.sort(users[names == name]) for name in dict.fromkeys(names)}

    def per_user(self, k: int) -> dict[str, np.ndarray]:
        """Per-user ``recall@k`` and ``ndcg@k``, in user order."""
        within = self.ranks <= k
        with np.errstate(divide="ignore"):
            gain = np.where(within, 1.0 / np.log2(self.ranks + 1.0), 0.0)
        return {f"recall@{k}": within.astype(np.float64), f"ndcg@{k}": gain}


def read_folder(path: str | Path) -> TestFolder:
    """Read a test folder and the target ranks of its predictions, with the evaluator's tie rule."""
    path = Path(path)
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        raise InputError(f"{path}: no metrics.json (is it an `mmrec test` output folder, <run_dir>/test/<model>-<split>?)")
    document = json.loads(metrics_path.read_text())
    table = read_table(path / "predictions.parquet", PREDICTIONS)
    if table.num_rows != document.get("n_users"):
        raise InputError(f"{path}: predictions.parquet has {table.num_rows} users, metrics.json {document.get('n_users')}")
    order = np.argsort(table.column("user_idx").to_numpy(), kind="stable")
    users = table.column("user_idx").to_numpy()[order]
    targets = table.column("target").to_numpy()[order]
    items, scores = padded_lists(table.column("items").to_pylist(), table.column("scores").to_pylist())
    ranks = list_ranks(torch.from_numpy(items), torch.from_numpy(scores), torch.from_numpy(targets.astype(np.int64)))
    return TestFolder(path, document, users, targets, ranks.numpy()[order])


def padded_lists(items: list[list[int]], scores: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged top-K lists (list models leave empty slots out) as ``[U, K]`` arrays: -1 items, -inf scores."""
    width = max((len(row) for row in items), default=0)
    padded_items = np.full((len(items), max(width, 1)), -1, dtype=np.int64)
    padded_scores = np.full((len(items), max(width, 1)), -np.inf, dtype=np.float32)
    for row, (row_items, row_scores) in enumerate(zip(items, scores)):
        padded_items[row, : len(row_items)] = row_items
        padded_scores[row, : len(row_scores)] = row_scores
    return padded_items, padded_scores


def check_comparable(first: TestFolder, other: TestFolder) -> None:
    """Refuse two folders that did not rank the same held-out items of the same users the same way."""

    def refuse(what: str, a: object, b: object) -> None:
        raise InputError(f"{first.path} and {other.path} differ in {what}: {a} vs {b}; only test folders of one "
                         "split, protocol, dataset and user set can be compared")

    a, b = first.document, other.document
    if a.get("split") != b.get("split"):
        refuse("split", a.get("split"), b.get("split"))
    for key in PROTOCOL_KEYS:
        if a["protocol"].get(key) != b["protocol"].get(key):
            refuse(f"protocol ({key})", a["protocol"].get(key), b["protocol"].get(key))
    items = "catalog_sha256" if same_catalog(a, b) else "items_sha256"  # content alone may differ over one catalog
    for key in (items, "interactions_sha256"):
        if a["dataset"].get(key) != b["dataset"].get(key):
            refuse(f"dataset ({key})", str(a["dataset"].get(key))[:12], str(b["dataset"].get(key))[:12])
    if not np.array_equal(first.users, other.users):
        only_a, only_b = np.setdiff1d(first.users, other.users), np.setdiff1d(other.users, first.users)
        refuse("users", f"{len(first.users)} users ({len(only_a)} not in the other)",
               f"{len(other.users)} users ({len(only_b)} not in the first)")
    if not np.array_equal(first.targets, other.targets):
        refuse("targets", f"{int((first.targets != other.targets).sum())} users' target", "the other's")


def same_catalog(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Both ``metrics.json`` documents record one catalog (earlier ones record none: their items tables must match)."""
    catalog = a["dataset"].get("catalog_sha256")
    return catalog is not None and catalog == b["dataset"].get("catalog_sha256")


def choose_k(folder: TestFolder, k: int | None) -> int:
    """``k`` if the folders measured it; by default 10 when measured, else the largest K measured."""
    measured = folder.document["protocol"]["k"]
    if k is None:
        return 10 if 10 in measured else max(measured)
    if k not in measured:
        raise InputError(f"--k {k} was not measured by {folder.path} (its metrics.json has K = {measured})")
    return k


def cross_check(folder: TestFolder, k: int) -> None:
    """The per-user metrics must average to the folder's own ``metrics.json``, or its predictions are not its figures."""
    for name, values in folder.per_user(k).items():
        recorded = folder.document["metrics"][name]
        if abs(values.mean() - recorded) > TOLERANCE:
            raise InputError(f"{folder.path}: {name} recomputed from predictions.parquet is {values.mean():.6f}, "
                             f"metrics.json says {recorded:.6f}; the two files are not from one evaluation")


def bootstrap_interval(differences: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of the mean difference over users resampled with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    n = len(differences)
    means = np.empty(resamples)
    step = max(1, BOOTSTRAP_BLOCK // n)
    for start in range(0, resamples, step):
        size = min(step, resamples - start)
        means[start : start + size] = differences[rng.integers(0, n, size=(size, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def p_values(differences: np.ndarray) -> tuple[float | None, float | None]:
    """Two-sided p-values of the paired t-test and the Wilcoxon signed-rank test (zero differences dropped).

    Identical results are no evidence of a difference: p = 1 (scipy would return nan). A p-value that is
    still undefined (constant nonzero differences: no variance to test against) is None.
    """
    if not differences.any():
        return 1.0, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = stats.ttest_1samp(differences, 0.0).pvalue
        w = stats.wilcoxon(differences).pvalue
    return tuple(None if math.isnan(p) else float(p) for p in (t, w))  # type: ignore[return-value]


def paired_statistics(baseline: np.ndarray, candidate: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    """Mean difference (candidate - baseline), its bootstrap interval, p-values and relative improvement."""
    differences = candidate - baseline
    base, mean = float(baseline.mean()), float(differences.mean())
    low, high = bootstrap_interval(differences, resamples, seed)
    p_t, p_w = p_values(differences)
    return {
        "baseline": base, "candidate": float(candidate.mean()), "difference": mean,
        "relative": mean / base if base > 0 else None, "ci95": [low, high], "p_ttest": p_t, "p_wilcoxon": p_w,
    }


def side_labels(sides: Sequence[Sequence[Path]]) -> list[str]:
    """One label per side: the folders' name; sides that share a label are lengthened by parent folders until
    they differ.

    Two variants tested alike have folders of one name (``plain/test/fusion-test`` against
    ``refined/test/fusion-test``), and a table that called both ``fusion-test`` would not say which is which.
    Within a side, folder names that differ are joined with ``+``; parents that differ (the seeds' run folders)
    read ``*``, as the shell pattern that named them would: ``plain/*/test/fusion-test``.
    """
    resolved = [[path.resolve() for path in side] for side in sides]
    depth = min(len(path.parts) for side in resolved for path in side)

    def label(side: list[Path], length: int) -> str:
        parts = []
        for back in range(length, 0, -1):
            values = sorted({path.parts[-back] for path in side})
            parts.append(values[0] if len(values) == 1 else "+".join(values) if back == 1 else "*")
        return "/".join(parts)

    lengths = [1] * len(resolved)
    while True:
        labels = [label(side, length) for side, length in zip(resolved, lengths)]
        shared = [i for i, text in enumerate(labels) if labels.count(text) > 1 and lengths[i] < depth - 1]
        if not shared:
            return labels
        for i in shared:
            lengths[i] += 1


def side_summary(folders: Sequence[TestFolder], k: int, label: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A side's description (folders, per-seed means, mean and std over seeds) and its seed-averaged per-user metrics."""
    per_seed = [folder.per_user(k) for folder in folders]
    names = list(per_seed[0])
    seed_means = {name: [float(values[name].mean()) for values in per_seed] for name in names}
    summary = {
        "label": label,
        "folders": [str(folder.path) for folder in folders],
        "per_seed": seed_means,
        "mean": {name: float(np.mean(means)) for name, means in seed_means.items()},
        "std": {name: float(np.std(means, ddof=1)) if len(means) > 1 else 0.0 for name, means in seed_means.items()},
    }
    averaged = {name: np.mean([values[name] for values in per_seed], axis=0) for name in names}
    return summary, averaged


def common_slices(first: TestFolder, others: Sequence[TestFolder]) -> dict[str, np.ndarray]:
    """The slices of ``first`` as positions into its users; every other folder must slice the users alike."""
    members = first.slice_members()
    for other in others:
        theirs = other.slice_members()
        if theirs.keys() != members.keys() or any(not np.array_equal(members[n], theirs[n]) for n in members):
            raise InputError(f"{first.path} and {other.path} slice the users differently (slices.parquet); "
                             "test both with the same --slice_shares and --history_buckets")
    stray = [name for name, users in members.items() if not np.isin(users, first.users).all()]
    if stray:
        raise InputError(f"{first.path}: slices.parquet puts users in {stray} that predictions.parquet does not hold")
    return {name: np.searchsorted(first.users, users) for name, users in members.items()}


def compare(
    baseline: Sequence[str | Path], candidates: Sequence[Sequence[str | Path]], k: int | None = None,
    resamples: int = 10_000, seed: int = 0, slices: bool = False,
) -> dict[str, Any]:
    """Compare each candidate side with the baseline side; each side is one folder or several seeds of one model;
    with ``slices``, also within each slice of the users (each comparison's ``"slices"``)."""
    if not baseline or not candidates or not all(candidates):
        raise InputError("give at least two test folders: a baseline and a candidate")
    if resamples < 1:
        raise InputError(f"--bootstrap must be at least 1, got {resamples}")
    base = [read_folder(path) for path in baseline]
    sides = [[read_folder(path) for path in side] for side in candidates]
    first = base[0]
    for folder in [*base[1:], *(folder for side in sides for folder in side)]:
        check_comparable(first, folder)
    k = choose_k(first, k)
    for folder in [*base, *(folder for side in sides for folder in side)]:
        cross_check(folder, k)
    positions = common_slices(first, [*base[1:], *(folder for side in sides for folder in side)]) if slices else {}
    base_label, *labels = side_labels([[folder.path for folder in side] for side in [base, *sides]])
    base_summary, base_values = side_summary(base, k, base_label)
    comparisons = []
    for side, label in zip(sides, labels):
        summary, values = side_summary(side, k, label)
        metrics = {name: paired_statistics(base_values[name], values[name], resamples, seed) for name in base_values}
        comparison: dict[str, Any] = {"candidate": summary, "metrics": metrics}
        if slices:
            comparison["slices"] = {
                name: {"n_users": len(rows), "metrics": {
                    metric: paired_statistics(base_values[metric][rows], values[metric][rows], resamples, seed)
                    for metric in base_values} if len(rows) else {}}
                for name, rows in positions.items()
            }
        comparisons.append(comparison)
    return {
        "split": first.document["split"],
        "protocol": {key: first.document["protocol"].get(key) for key in PROTOCOL_KEYS},
        "dataset": {key: first.document["dataset"].get(key) for key in DATASET_KEYS},
        "n_users": len(first.users),
        "k": k,
        "bootstrap": {"resamples": resamples, "seed": seed, "interval": "percentile 95%"},
        "baseline": base_summary,
        "comparisons": comparisons,
    }


def format_p(x: float | None) -> str:
    """A p-value as the tables print it."""
    return "n/a" if x is None else f"{x:.2g}" if x < 1e-3 else f"{x:.3f}"


def format_evidence(statistics: dict[str, Any]) -> tuple[str, str]:
    """A comparison's relative difference and 95% interval as the tables print them."""
    relative = "n/a" if statistics["relative"] is None else f"{statistics['relative']:+.1%}"
    return relative, f"[{statistics['ci95'][0]:+.4f}, {statistics['ci95'][1]:+.4f}]"


def format_comparison(result: dict[str, Any]) -> str:
    """The console table: each metric of the baseline, then each candidate's difference with its evidence."""

    def value(side: dict[str, Any], name: str) -> str:
        seeds = len(side["folders"])
        return f"{side['mean'][name]:.4f}" + (f" ± {side['std'][name]:.4f}" if seeds > 1 else "")

    masked = "history masked" if result["protocol"]["mask_history"] else "history not masked"
    seeds = len(result["baseline"]["folders"])
    header = (f"compare on {result['split']}: {result['n_users']:,} users, K={result['k']}, {masked}; "
              f"paired over users, {result['bootstrap']['resamples']:,} bootstrap resamples (seed {result['bootstrap']['seed']})"
              + (f"; per-user metrics averaged over {seeds} seeds, mean ± std over seeds" if seeds > 1 else ""))
    labels = [result["baseline"]["label"], *(c["candidate"]["label"] for c in result["comparisons"])]
    width = max(len(label) for label in labels) + 2
    rows = [header, (f"{'metric':<10}  {'model':<{width}}  {'mean':>17}  {'diff':>8}  {'95% CI':>19}  "
                    f"{'rel':>7}  {'p(t)':>6}  {'p(wilcoxon)':>11}")]
    for name in result["baseline"]["mean"]:
        rows.append(f"{name:<10}  {'* ' + labels[0]:<{width}}  {value(result['baseline'], name):>17}")
        for comparison in result["comparisons"]:
            s = comparison["metrics"][name]
            relative, interval = format_evidence(s)
            rows.append(f"{'':<10}  {'  ' + comparison['candidate']['label']:<{width}}  "
                        f"{value(comparison['candidate'], name):>17}  {s['difference']:+8.4f}  {interval:>19}  "
                        f"{relative:>7}  {format_p(s['p_ttest']):>6}  {format_p(s['p_wilcoxon']):>11}")
    rows.append("* baseline; diff = candidate - baseline, rel = diff / baseline; p-values two-sided")
    for comparison in result["comparisons"]:
        if "slices" in comparison:
            rows.extend(["", format_slices(result["baseline"]["label"], comparison)])
    return "\n".join(rows)


def format_slices(baseline: str, comparison: dict[str, Any]) -> str:
    """One comparison's figures slice by slice: each side's mean (over seeds), the difference and its evidence."""

    rows = [f"by slice: {comparison['candidate']['label']} against {baseline}",
            (f"{'slice':<13}  {'users':>6}  {'metric':<10}  {'baseline':>8}  {'candidate':>9}  {'diff':>8}  "
             f"{'95% CI':>19}  {'rel':>7}  {'p(t)':>6}")]
    for name, part in comparison["slices"].items():
        if not part["metrics"]:
            rows.append(f"{name:<13}  {part['n_users']:>6}  (no users)")
        for metric, s in part["metrics"].items():
            relative, interval = format_evidence(s)
            rows.append(f"{name:<13}  {part['n_users']:>6}  {metric:<10}  {s['baseline']:>8.4f}  {s['candidate']:>9.4f}  "
                        f"{s['difference']:+8.4f}  {interval:>19}  {relative:>7}  {format_p(s['p_ttest']):>6}")
    return "\n".join(rows)
