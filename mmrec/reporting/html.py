"""Render a collected run as one self-contained HTML page.

Self-contained on purpose: the page is mailed, attached to issues and opened on machines without network,
so figures are PNG data URIs, the style sheet is inline, and nothing is fetched.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable
from html import escape
from typing import Any

from mmrec import __version__
from mmrec.reporting import figures
from mmrec.reporting.collect import Run, TestResult, TrainingStage

SECTIONS = {
    "dataset": "Dataset",
    "models": "Models on the test protocol",
    "slices": "Slices",
    "sids": "Semantic IDs",
    "curves": "Training and validation curves",
    "throughput": "Throughput",
}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: .6em 0; }
.note { color: #666; font-size: .9em; }
.problem { color: #a00; }
"""

THROUGHPUT_KEYS = {
    "epochs": "epochs",
    "global_steps": "steps",
    "steps": "steps",
    "fit_wall_time_s": "fit wall time (s)",
    "wall_time_s": "fit wall time (s)",
    "train_seconds": "train seconds",
    "tokens_per_second": "tokens/s",
    "tokens_per_second_steady": "tokens/s (steady)",
    "epoch_boundary_seconds": "between epochs (s)",
    "checkpoint_staging_s": "checkpoint copies (s)",
    "peak_gpu_memory_gib": "peak GPU memory (GiB)",
    "device": "device",
    "world_size": "processes",
}


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return " / ".join(fmt(v) for v in value)
    return str(value)


def table(header: list[str], rows: Iterable[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def dataset_section(run: Run) -> str:
    data = run.dataset
    if data is None:
        return note("no prepare stage in this run directory")
    counts = data.prepare_extra.get("counts", {})
    rows = [
        ["source", data.source], *([name, n] for name, n in data.counts.items()),
        *([f"{split} interactions", n] for split, n in data.splits.items()),
        ["mean history length", counts.get("mean_length", float(data.history_lengths.mean()))],
        ["sparsity", counts.get("sparsity")],
    ]
    for modality in ("text", "image"):
        info = data.prepare_extra.get(modality)
        if isinstance(info, dict) and "present" in info:
            rows.append([f"items with {modality}", f"{info['present']:,} ({info.get('dim', '?')}-d), {info.get('missing', 0):,} missing"])
    return table(["", "value"], rows) + image(figures.history_lengths(data.history_lengths), "interactions per user")


def models_section(tests: list[TestResult]) -> str:
    if not tests:
        return note("no tested model (run mmrec test --model NAME)")
    names = [t.name for t in tests]
    metrics = [t.document["metrics"] for t in tests]
    keys = list(dict.fromkeys(key for m in metrics for key in m))
    scores = table(["test", *keys], ([t.name, *(t.document["metrics"].get(k) for k in keys)] for t in tests))
    protocol = table(
        ["test", "model", "split", "users", "items", "history masked", "ranking", "MRR cut at", "ties", "precision", "device"],
        ([t.name, t.document.get("model"), t.document.get("split"), t.document.get("n_users"),
          t.document.get("dataset", {}).get("num_items"), t.document["protocol"].get("mask_history"),
          t.document["protocol"].get("ranking"), t.document["protocol"].get("mrr_cutoff"),
          t.document["protocol"].get("ties"), t.document.get("precision"), t.document.get("device")] for t in tests),
    )
    return scores + image(figures.model_metrics(names, metrics), "metrics per model") + "<h3>Protocol</h3>" + protocol


def slice_rows(slices: Any, path: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """Flatten nested slices down to their metric dicts (a dict whose values are not dicts)."""
    if isinstance(slices, dict) and slices and all(not isinstance(v, dict) for v in slices.values()):
        return [(" / ".join(path), slices)]
    if isinstance(slices, dict):
        return [row for key, value in slices.items() for row in slice_rows(value, (*path, str(key)))]
    return []


def slices_section(tests: list[TestResult]) -> str:
    parts = []
    for test in tests:
        rows = slice_rows(test.document.get("slices"))
        if rows:
            keys = list(dict.fromkeys(key for _, values in rows for key in values))
            parts.append(f"<h3>{escape(test.name)}</h3>" + table(["slice", *keys], ([name, *(v.get(k) for k in keys)] for name, v in rows)))
    return "".join(parts) or note("no slices recorded in the tests' metrics.json")


def sids_section(run: Run) -> str:
    if run.sids is None:
        return note("no assign-sids report in this run directory")
    report = run.sids.report
    rows = []
    for modality, r in report.items():
        before, after = r["collisions_before"], r["collisions_after"]
        rows.append([
            modality, r["items"], r["items_without_sid"], r["levels"], r["codebook_sizes"],
            " / ".join(f"{u:.0%}" for u in r["utilisation"]), " / ".join(f"{p:.1f}" for p in r["perplexity"]),
            f"{before['colliding_items']} ({before['collision_rate']:.1%})",
            f"{after['colliding_items']} ({after['collision_rate']:.1%})", before["largest_group"],
            r["resolution"]["applied"], r.get("kendall_tau"),
        ])
    header = ["modality", "items", "without SID", "levels", "codebook sizes", "codes used per level", "perplexity per level",
              "colliding items before", "after", "largest group", "resolution", "Kendall tau"]
    png = run.sids.png.read_bytes() if run.sids.png is not None else figures.sid_usage(report)
    return table(header, rows) + image(png, "code usage per level")


def stage_curves(stage: TrainingStage) -> str:
    title = f"<h3>{escape(stage.name)}</h3>"
    if stage.curves is None:
        return title + note("no curves logged (the stage's config sets trainer.logger: false)")
    png, left_out = figures.curves(stage.curves)
    if png is None:
        return title + note(f"{stage.curves_path}: no metrics logged")
    more = note(f"{left_out} more panels in {stage.curves_path}") if left_out else ""
    return title + image(png, f"{stage.name} curves") + note(f"from {stage.curves_path}") + more


def curves_section(run: Run) -> str:
    return "".join(stage_curves(stage) for stage in run.training) or note("no trained stage in this run directory")


def throughput_section(run: Run) -> str:
    if not run.training:
        return note("no trained stage in this run directory")
    columns = list(dict.fromkeys(THROUGHPUT_KEYS[k] for s in run.training for k in s.extra if k in THROUGHPUT_KEYS))
    rows = []
    for stage in run.training:
        values = {THROUGHPUT_KEYS[k]: v for k, v in stage.extra.items() if k in THROUGHPUT_KEYS}
        rows.append([stage.name, *(values.get(c) for c in columns)])
    return table(["stage", *columns], rows) + note("peak GPU memory is empty on a CPU; tokens/s is recorded by the LLM stages")


def render(run: Run) -> str:
    """The whole page."""
    bodies = {
        "dataset": dataset_section(run),
        "models": models_section(run.tests),
        "slices": slices_section(run.tests),
        "sids": sids_section(run),
        "curves": curves_section(run),
        "throughput": throughput_section(run),
    }
    problems = "".join(f'<p class="problem">{escape(line)}</p>' for line in run.problems)
    sections = "".join(f'<section id="{key}"><h2>{escape(SECTIONS[key])}</h2>{body}</section>' for key, body in bodies.items())
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>mmrec report: {escape(str(run.path))}</title>'
        f"<style>{STYLE}</style></head><body><h1>mmrec report: {escape(str(run.path))}</h1>"
        + note(f"written {time.strftime('%Y-%m-%d %H:%M:%S %z')} by mmrec {__version__}") + problems + sections
        + "</body></html>\n"
    )
