"""``mmrec recommend``: the top-K items a trained model recommends to a user, after an ad-hoc history, or to
every user of a file.

Whose history: ``--user`` reads the user's **whole** history from the run's data, train, validation and test
interactions alike. "What comes next" is asked after everything the user did; the leave-one-out split only
holds items back to measure a model (``mmrec test`` ranks after train + valid for the test target), and
holding them back here would recommend as of an earlier moment. ``--history`` takes item ids as
``items.parquet``'s ``item_id`` strings, oldest first.

The model, its batches and its ranking are those of ``mmrec test``: :func:`load_recommender`, histories
left-padded by :func:`left_pad` and kept whole (models truncate them themselves), and
:func:`mmrec.evaluation.topk.top_k`. So a recommendation after a user's train + valid items with
``--exclude_history false`` is that user's row of ``mmrec test``'s ``predictions.parquet``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from jsonargparse import auto_cli

from mmrec.artifacts.schemas import RECOMMENDATIONS, write_table
from mmrec.artifacts.stage_output import atomic_file
from mmrec.data.datamodules import left_pad
from mmrec.data.prepared import PreparedData
from mmrec.errors import InputError
from mmrec.evaluation.protocol import AnyRecommender
from mmrec.evaluation.registry import load_recommender
from mmrec.evaluation.topk import history_items, top_k
from mmrec.stages.test import resolve_device

SHOWN_UNKNOWN = 5
"""How many unknown ids an error names (the count says how many there were)."""

TITLE_WIDTH = 60


@dataclass(frozen=True)
class Recommendation:
    """One recommended item of one history, ``rank`` 1 first."""

    rank: int
    item_idx: int
    item_id: str
    title: str | None
    score: float


def lookup(ids: list[str], known: dict[str, int], what: str, source: str) -> list[int]:
    """Indices of ``ids``, or one InputError naming the first few unknown ones."""
    unknown = list(dict.fromkeys(i for i in ids if i not in known))
    if unknown:
        shown = ", ".join(unknown[:SHOWN_UNKNOWN]) + (", ..." if len(unknown) > SHOWN_UNKNOWN else "")
        raise InputError(f"{len(unknown)} unknown {what} id(s) in {source}: {shown}")
    return [known[i] for i in ids]


def index_of(table: pa.Table, id_column: str, idx_column: str) -> dict[str, int]:
    return dict(zip(table.column(id_column).to_pylist(), table.column(idx_column).to_pylist()))


def read_user_ids(path: str) -> list[str]:
    """One user id a line; blank lines are skipped."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: file not found")
    ids = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not ids:
        raise InputError(f"{file}: no user ids (expected one a line)")
    return ids


def recommend_batch(
    model: AnyRecommender,
    histories: list[np.ndarray],
    prepared: PreparedData,
    k: int,
    exclude_history: bool,
    device: torch.device,
    batch_size: int,
) -> list[list[Recommendation]]:
    """Top-``k`` per history, batched in order of length as ``mmrec test`` batches (less padding)."""
    num_items = prepared.num_items
    k = min(k, num_items)
    ids, texts = prepared.items.column("item_id").to_pylist(), prepared.items.column("text").to_pylist()
    order = np.argsort([len(h) for h in histories], kind="stable")
    results: list[list[Recommendation]] = [[] for _ in histories]
    if isinstance(model, torch.nn.Module):
        model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            items, mask = left_pad([histories[r] for r in rows], sys.maxsize)
            batch = {"user_idx": torch.full((len(rows),), -1, dtype=torch.long), "history": items, "mask": mask}
            batch = {name: value.to(device) for name, value in batch.items()}
            exclude = history_items(batch, num_items) if exclude_history else None
            top = top_k(model, batch, k, num_items, exclude)
            for row, item_row, score_row in zip(rows, top.items.cpu().tolist(), top.scores.float().cpu().tolist()):
                kept = [(i, s) for i, s in zip(item_row, score_row) if i >= 0 and s != -float("inf")]
                results[row] = [Recommendation(rank, i, ids[i], texts[i], s) for rank, (i, s) in enumerate(kept, 1)]
    return results


def format_table(recommendations: list[Recommendation]) -> str:
    """A fixed-width console table: rank, item id, title (shortened), score."""
    id_width = max([len("item id"), *(len(r.item_id) for r in recommendations)])
    lines = [f"{'rank':>4}  {'item id':<{id_width}}  {'title':<{TITLE_WIDTH}}  {'score':>10}"]
    for r in recommendations:
        title = (r.title or "").replace("\n", " ")
        title = title if len(title) <= TITLE_WIDTH else title[: TITLE_WIDTH - 3] + "..."
        lines.append(f"{r.rank:>4}  {r.item_id:<{id_width}}  {title:<{TITLE_WIDTH}}  {r.score:>10.4f}")
    return "\n".join(lines)


def format_json(recommendations: list[Recommendation]) -> str:
    return json.dumps([{"item_id": r.item_id, "title": r.title, "score": r.score} for r in recommendations], indent=2)


def write_recommendations(user_ids: list[str], results: list[list[Recommendation]], path: Path) -> int:
    """Write the RECOMMENDATIONS table atomically (a temporary file renamed into place); return its rows."""
    rows = [(user, r) for user, recs in zip(user_ids, results) for r in recs]
    table = pa.table(
        {
            "user_id": [user for user, _ in rows],
            "rank": [r.rank for _, r in rows],
            "item_id": [r.item_id for _, r in rows],
            "item_idx": [r.item_idx for _, r in rows],
            "title": [r.title for _, r in rows],
            "score": [r.score for _, r in rows],
        },
        schema=RECOMMENDATIONS,
    )
    with atomic_file(path) as partial:
        write_table(table, partial, RECOMMENDATIONS)
    return table.num_rows


def recommend(
    run_dir: str = "runs/demo",
    model: str = "fusion",
    user: str | None = None,
    history: str | None = None,
    users: str | None = None,
    k: int = 10,
    exclude_history: bool = True,
    format: Literal["table", "json"] = "table",
    output: str | None = None,
    checkpoint: str | None = None,
    batch_size: int = 256,
    device: Literal["auto", "cpu", "cuda"] = "auto",
) -> list[list[Recommendation]]:
    """Recommend the next items: for one user, after an ad-hoc history, or for every user of a file.

    Args:
        run_dir: run directory holding prepare/ and the model's stage folder.
        model: registered model name: fusion, generative, sasrec or popularity.
        user: a user id (users.parquet's user_id); recommends after the user's whole history (train, valid
            and test interactions: the next item after everything known).
        history: item ids (items.parquet's item_id), oldest first, separated by spaces.
        users: a file of user ids, one a line; writes the top-k of each to --output (Parquet) instead of printing.
        k: how many items to recommend.
        exclude_history: never recommend an item of the history (true: what a user has not had yet; false: the
            ranking ``mmrec test`` measures by default).
        format: table or json (a list of objects with item_id, title, score) for --user and --history.
        output: Parquet file for --users (default: <run_dir>/recommend/<model>.parquet), written atomically.
        checkpoint: use these weights instead of the run's exported model.
        batch_size: histories per model call.
        device: auto picks cuda when available.
    """
    if sum(option is not None for option in (user, history, users)) != 1:
        raise InputError("give exactly one of --user USER_ID, --history \"ITEM_ID ...\" or --users FILE")
    if output is not None and users is None:
        raise InputError("--output is for --users FILE (one user or history is printed)")
    if k < 1 or batch_size < 1:
        raise InputError(f"k and batch_size must be at least 1, got k={k}, batch_size={batch_size}")
    prepared = PreparedData(run_dir)
    user_index = index_of(prepared.users, "user_id", "user_idx")
    if history is not None:
        ids = history.split()
        if not ids:
            raise InputError("--history is empty; give item ids separated by spaces")
        histories = [np.asarray(lookup(ids, index_of(prepared.items, "item_id", "item_idx"), "item", "--history"))]
    else:
        user_ids = [user] if user is not None else read_user_ids(users)
        source = "--user" if user is not None else users
        histories = [prepared.sequences[u] for u in lookup(user_ids, user_index, "user", source)]
    torch_device = resolve_device(device)
    recommender = load_recommender(model, run_dir, checkpoint, torch_device)
    results = recommend_batch(recommender, histories, prepared, k, exclude_history, torch_device, batch_size)
    if users is not None:
        path = Path(output) if output else Path(run_dir) / "recommend" / f"{model}.parquet"
        rows = write_recommendations(user_ids, results, path)
        print(f"recommend: wrote {path} ({len(user_ids)} users, {rows} rows)")
    else:
        print(format_json(results[0]) if format == "json" else format_table(results[0]))
    return results


def main(argv: list[str]) -> None:
    auto_cli(recommend, args=argv, as_positional=False, prog="mmrec recommend")
