"""The SID quality report: are these semantic IDs fit for a recommender to use?

For each modality it records

- **utilisation** per level: the share of the K codes that at least one item uses, and the perplexity
  (``exp`` of the code-usage entropy; K for perfectly even use, 1 when every item takes one code);
- **collisions** before and after resolution (items sharing a tuple, distinct shared tuples, the largest
  group), see :mod:`mmrec.models.sid_collisions`;
- **distance preservation** (MME-SID): Kendall's tau-b between the Euclidean distances of sampled item
  pairs in the original embedding space and in code-embedding space, where an item's code embedding is the sum of its
  codebook vectors (exactly what ``SIDEmbedding`` starts from with ``init="codebook"``). The same figure
  for *random* codes drawn uniformly per level from the same codebooks is the floor to compare with: a
  quantizer whose tau is close to it has kept no distance information. Given the encoder's latents, the
  figure is split in two: original vs latent (what the encoder keeps) and latent vs code embedding (what
  quantization keeps), which tells whether to fix the encoder's training or the codebooks.

The per-level figures and Kendall's tau come from :mod:`mmrec.metrics.codes`, which
``fit-quantizer`` logs with, so training logs and this report agree.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mmrec.metrics.codes import code_perplexity, code_utilisation, kendall_tau_distances
from mmrec.models.sid_collisions import ResolvedCodes


def code_vectors(codes: np.ndarray, codebooks: list[np.ndarray]) -> np.ndarray:
    """Each item's sum of codebook vectors over the levels that have a codebook: ``[N, D]``."""
    return sum(book[codes[:, level]] for level, book in enumerate(codebooks))


def random_codes(num_items: int, sizes: list[int], seed: int) -> np.ndarray:
    """Codes drawn uniformly and independently per level: the no-information baseline."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, size, num_items) for size in sizes], axis=1)


def _finite(value: float) -> float | None:
    """NaN (e.g. tau when every pair is at the same distance) as None, so report.json stays valid JSON."""
    return None if math.isnan(value) else value


def distance_preservation(
    original: np.ndarray,
    codes: np.ndarray,
    codebooks: list[np.ndarray],
    num_pairs: int = 10_000,
    seed: int = 0,
    latents: np.ndarray | None = None,
) -> dict[str, float | int | None]:
    """Kendall's tau of Euclidean pair distances, original vs code embeddings and vs random codes.

    All figures use the same sampled pairs (same ``seed``). With the encoder's ``latents``, the headline
    figure is split into where distance information is lost: ``kendall_tau_encoder`` (original vs latent)
    and ``kendall_tau_quantization`` (latent vs code embedding).
    """
    if len(original) < 2:
        return {"pairs": 0, "kendall_tau": None, "kendall_tau_random": None}
    vectors = code_vectors(codes, codebooks)
    baseline = code_vectors(random_codes(len(codes), [len(book) for book in codebooks], seed), codebooks)
    result = {
        "pairs": num_pairs,
        "kendall_tau": _finite(kendall_tau_distances(original, vectors, num_pairs, seed)),
        "kendall_tau_random": _finite(kendall_tau_distances(original, baseline, num_pairs, seed)),
    }
    if latents is not None:
        result["kendall_tau_encoder"] = _finite(kendall_tau_distances(original, latents, num_pairs, seed))
        result["kendall_tau_quantization"] = _finite(kendall_tau_distances(latents, vectors, num_pairs, seed))
    return result


def modality_report(
    original: np.ndarray,
    resolved: ResolvedCodes,
    codebooks: list[np.ndarray],
    absent: int,
    num_pairs: int = 10_000,
    seed: int = 0,
    latents: np.ndarray | None = None,
) -> dict[str, Any]:
    """The report of one modality; ``original [N, d]``, ``resolved`` (and the encoder's ``latents [N, D]``)
    cover the items that have content.

    Utilisation and distances use the quantizer's levels of the *resolved* codes (what recommenders will
    embed): ``reassign`` changes last-level codes, a ``suffix`` level has no codebook and is left out.
    """
    sizes = [len(book) for book in codebooks]
    codes = resolved.codes[:, : len(codebooks)]
    per_level = [codes[:, [level]] for level in range(len(sizes))]
    return {
        "items": len(original),
        "items_without_sid": int(absent),
        "levels": int(resolved.codes.shape[1]),
        "codebook_sizes": sizes,
        "utilisation": [code_utilisation(c, k)[0] for c, k in zip(per_level, sizes)],
        "perplexity": [code_perplexity(c, k)[0] for c, k in zip(per_level, sizes)],
        "code_counts": [np.bincount(c[:, 0], minlength=k).tolist() for c, k in zip(per_level, sizes)],
        "resolution": {"requested": resolved.requested, "applied": resolved.applied, "moved": resolved.moved},
        "collisions_before": resolved.before.as_dict(),
        "collisions_after": resolved.after.as_dict(),
        **distance_preservation(original, codes, codebooks, num_pairs, seed, latents),
    }


def summary(report: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The report without per-code counts: what goes into the manifest and the printed table."""
    return {m: {k: v for k, v in r.items() if k != "code_counts"} for m, r in report.items()}


def _tau(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(report: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table, one row per modality, for the terminal and the benchmark notes."""
    header = ["modality", "items", "no SID", "util/level", "coll. before", "coll. after", "largest group", "resolution",
              "tau", "tau random",
              "tau encoder", "tau quantization"]
    rows = [header]
    for modality, r in report.items():
        before, after = r["collisions_before"], r["collisions_after"]
        applied = r["resolution"]["applied"]
        if r["resolution"]["requested"] != applied:
            applied = f"{r['resolution']['requested']}->{applied}"
        rows.append([
            modality, str(r["items"]), str(r["items_without_sid"]),
            "/".join(f"{u:.0%}" for u in r["utilisation"]),
            f"{before['colliding_items']} ({before['collision_rate']:.1%})",
            f"{after['colliding_items']} ({after['collision_rate']:.1%})",
            str(before["largest_group"]), applied, _tau(r["kendall_tau"]), _tau(r["kendall_tau_random"]),
            _tau(r.get("kendall_tau_encoder")), _tau(r.get("kendall_tau_quantization")),
        ])
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def plot_usage(report: dict[str, dict[str, Any]], path: str | Path) -> bool:
    """Rank-frequency curves of code usage, one panel per modality, one line per level.

    Drawn on matplotlib's Agg canvas without pyplot, so no global backend state changes. Returns False
    (with a warning) when matplotlib, an optional extra (``pip install 'mmrec[plot]'``), is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'mmrec[plot]'); skipping report.png", stacklevel=2)
        return False
    fig = Figure(figsize=(5 * len(report), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(report), squeeze=False)[0]
    for ax, (modality, r) in zip(axes, report.items()):
        for level, counts in enumerate(r["code_counts"]):
            ranked = np.sort(np.asarray(counts))[::-1]
            label = f"level {chr(ord('a') + level)}: {r['utilisation'][level]:.0%} of {len(ranked)} used"
            ax.step(np.arange(1, len(ranked) + 1), ranked, where="mid", label=label)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("code rank")
        ax.set_ylabel("items per code")
        ax.set_title(f"{modality}: Kendall tau {_tau(r['kendall_tau'])} (random codes {_tau(r['kendall_tau_random'])})",
                     fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100, metadata={"Software": None})
    return True
