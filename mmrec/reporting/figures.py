"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas (no pyplot, no global state).

matplotlib is the optional ``plot`` extra; :func:`require_matplotlib` turns its absence into one error line
before any work is done.
"""

from __future__ import annotations

import io
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmrec.errors import MMRecError
from mmrec.evaluation.sid_quality import plot_usage

MODALITIES = ("collab", "text", "image")
"""Names that mark a per-modality metric in the logged curves (a line of its quantity's panel)."""

PANEL_COLUMNS = 4
MAX_PANELS = 24
"""Curves beyond this many panels per stage are left out (the table under the figure says so)."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MMRecError("mmrec report draws its figures with matplotlib: pip install 'mmrec[plot]'") from None


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    return buffer.getvalue()


def history_lengths(lengths: np.ndarray) -> bytes:
    """Histogram of interactions per user."""
    figure = _figure(6, 3)
    ax = figure.subplots()
    ax.hist(lengths, bins=min(50, max(1, int(lengths.max() - lengths.min() + 1))), color="#4c72b0")
    ax.set_xlabel("interactions per user")
    ax.set_ylabel("users")
    return _png(figure)


def model_metrics(names: list[str], metrics: list[dict[str, float]]) -> bytes:
    """Grouped bars: one group per metric, one bar per tested model."""
    keys = [key for key in metrics[0] if all(key in m for m in metrics)]
    figure = _figure(max(6.0, 1.2 * len(keys)), 3.4)
    ax = figure.subplots()
    width = 0.8 / len(names)
    for i, (name, values) in enumerate(zip(names, metrics)):
        ax.bar(np.arange(len(keys)) + i * width, [values[k] for k in keys], width, label=name)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys)
    ax.legend(fontsize=8)
    return _png(figure)


def sid_usage(report: dict[str, dict[str, Any]]) -> bytes:
    """assign-sids' own usage plot (rank-frequency of codes per level), drawn from its report."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "usage.png"
        plot_usage(report, path)
        return path.read_bytes()


def panel_of(column: str) -> tuple[str, str]:
    """``(panel, line)`` of a logged metric. A modality in the name becomes the line, the rest the panel:
    ``train/text/recon`` -> (train/recon, text), ``train/align/image`` -> (train/align, image), ``collab/util_l0``
    (the quantizer's validation) -> (val/util_l0, collab). Otherwise the first part is the panel:
    ``train/loss`` -> (train, loss), ``val/ndcg@10`` -> (val, ndcg@10).

    Ranking metrics share a panel (one scale); per-modality quantities get a panel each, one line per
    modality, so that quantities of different scales never share an axis.
    """
    parts = column.split("/")
    modalities = [part for part in parts if part in MODALITIES]
    if modalities:
        rest = [part for part in parts if part not in MODALITIES]
        panel = "/".join(rest if rest[0] in ("train", "val") else ["val", *rest])
        return panel, "/".join(modalities)
    if len(parts) > 1:
        return parts[0], "/".join(parts[1:])
    return column, column


def curves(frame: pd.DataFrame) -> tuple[bytes | None, int]:
    """Small multiples of every logged metric against the training step; returns the PNG (None when nothing
    was logged) and how many panels were left out (beyond :data:`MAX_PANELS`)."""
    panels: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for column in frame.columns:
        if column not in ("epoch", "step") and frame[column].notna().any():
            panel, line = panel_of(column)
            panels[panel].append((line, column))
    names = sorted(panels, key=lambda p: (not p.startswith("train"), p))
    shown = names[:MAX_PANELS]
    if not shown or "step" not in frame:
        return None, 0
    rows = -(-len(shown) // PANEL_COLUMNS)
    columns = min(PANEL_COLUMNS, len(shown))
    figure = _figure(3.2 * columns, 2.5 * rows)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for ax, name in zip(axes, shown):
        for line, column in panels[name]:
            points = frame[["step", column]].dropna()
            ax.plot(points["step"], points[column], marker="." if len(points) < 30 else None, label=line)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(panels[name]) > 1:
            ax.legend(fontsize=6)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    return _png(figure), len(names) - len(shown)
