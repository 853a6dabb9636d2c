"""The table ``mmrec pipeline`` ends with: every tested model side by side, from each ``metrics.json``."""

from __future__ import annotations

from typing import Any


def comparison_table(documents: list[dict[str, Any]]) -> str:
    """One row per evaluation (model, split, protocol), Recall@K / NDCG@K for every K any of them used, and MRR.

    Rows measured under different protocols (masked history, another split) stay apart and say so, since
    their figures are not comparable.
    """
    ks = sorted({k for doc in documents for k in doc["protocol"]["k"]})
    header = ["model", "split", "history", *(f"{m}@{k}" for k in ks for m in ("R", "N")), "MRR"]
    rows = [
        [
            doc["model"], doc["split"], "masked" if doc["protocol"]["mask_history"] else "kept",
            *(_cell(doc["metrics"], f"{m}@{k}") for k in ks for m in ("recall", "ndcg")),
            _cell(doc["metrics"], "mrr"),
        ]
        for doc in documents
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i < 3 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(metrics: dict[str, float], name: str) -> str:
    return f"{metrics[name]:.4f}" if name in metrics else "-"
