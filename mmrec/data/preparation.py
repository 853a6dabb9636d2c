"""From a source's raw data to the canonical tables and item embeddings, in memory.

Every source goes through the same steps, in this order:

1. interactions whose item is not in the items table are dropped and counted (or, with
   ``filters.unknown_items: fail``, reported as an error);
2. each user's interactions are ordered by timestamp (stable: ties and timestamp-less sources keep file
   order); users are taken in order of first appearance in the input;
3. the k-core filter runs to its fixed point; then each user keeps the ``max_history`` most recent
   interactions; then users with fewer than 3 interactions, which leave-one-out cannot split, are dropped;
4. items are numbered 0.. in order of first appearance in the filtered sequences (for Beauty this
   reproduces the S3-Rec/TIGER ``Beauty.txt`` numbering, minus 1); with ``split.new_items``, a seeded share of
   them becomes new (:func:`~mmrec.data.split.hold_out_new_items`: kept only as test targets, users then too
   short dropped); users are numbered in order of first appearance and split leave-one-out;
5. item texts are rendered, rewritten by a language model when ``text.refine`` is on (the rewrite is what gets
   embedded), and embedded; image embeddings encoded or aligned.

Nothing here writes: the stage writes the result only once all of it exists, so a bad input leaves no
artifact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from mmrec.artifacts.schemas import INTERACTIONS, ITEMS, USERS, with_optional
from mmrec.data.filters import FilterOptions, apply_filters, chronological, drop_unknown_items
from mmrec.data.image_embeddings import ImageOptions
from mmrec.data.item_text import render_texts
from mmrec.data.modality_embeddings import image_modality, text_modality
from mmrec.data.sources import RawData
from mmrec.data.split import MIN_SPLIT_LENGTH, SplitOptions, hold_out_new_items, leave_one_out
from mmrec.data.text_embeddings import TextOptions
from mmrec.data.text_refinement import Refinement, refine_texts
from mmrec.errors import InputError


@dataclass
class Prepared:
    """The tables and embeddings about to be written, with the counts for the report."""

    items: pa.Table
    users: pa.Table
    interactions: pa.Table
    embeddings: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def build_prepared(
    raw: RawData,
    filters: FilterOptions,
    text: TextOptions,
    image: ImageOptions | None,
    split_options: SplitOptions = SplitOptions(),  # noqa: B008 (frozen, so safe to share)
    seed: int = 0,
) -> Prepared:
    """Everything but the writing: filter, order, number, hold out new items, split, render texts, embed."""
    frame = raw.interactions
    raw_users, raw_items = int(frame["user_id"].nunique()), int(frame["item_id"].nunique())
    summary: dict[str, Any] = {"raw": {"users": raw_users, "items": raw_items, "interactions": len(frame)}}
    frame, unknown = drop_unknown_items(raw, filters.unknown_items)
    frame, dropped = apply_filters(chronological(frame), filters)
    if frame.empty:
        raise InputError(
            f"{raw.interactions_name}: no user has {MIN_SPLIT_LENGTH} or more interactions after filtering "
            f"(filters: {asdict(filters)})"
        )
    item_idx, item_ids = pd.factorize(frame["item_id"])
    keep, new_items = hold_out_new_items(
        pd.factorize(frame["user_id"])[0], item_idx, len(item_ids), split_options.new_items, seed
    )
    held_out, users_before = int((~keep).sum()), int(frame["user_id"].nunique())
    frame, item_idx = frame[keep], item_idx[keep]
    if frame.empty:
        raise InputError(f"split.new_items {split_options.new_items}: no user keeps {MIN_SPLIT_LENGTH} interactions")
    user_idx, user_ids = pd.factorize(frame["user_id"])
    position, split = leave_one_out(user_idx)
    item_ids = [str(item) for item in item_ids]
    texts = render_texts(raw.items, item_ids, text.template, raw.text_columns)
    refinement = refined_texts(texts, text, seed)
    images = image_references(raw, item_ids)
    result = Prepared(
        items=pa.table(
            {"item_idx": np.arange(len(item_ids), dtype=np.int32), "item_id": item_ids, "text": texts, "image": images,
             "text_refined": refinement.texts if refinement else [None] * len(item_ids)},
            schema=with_optional(ITEMS),
        ),
        users=pa.table(
            {"user_idx": np.arange(len(user_ids), dtype=np.int32), "user_id": [str(user) for user in user_ids]},
            schema=USERS,
        ),
        interactions=pa.table(
            {
                "user_idx": user_idx.astype(np.int32),
                "item_idx": item_idx.astype(np.int32),
                "position": position.astype(np.int32),
                "timestamp": pa.Array.from_pandas(frame["timestamp"], type=pa.int64()),
                "split": split,
            },
            schema=INTERACTIONS,
        ),
    )
    users, items, interactions = len(user_ids), len(item_ids), len(frame)
    summary["counts"] = {
        "users": users,
        "items": items,
        "interactions": interactions,
        "sparsity": 1.0 - interactions / (users * items),
        "mean_length": interactions / users,
        "max_length": int(np.bincount(user_idx).max()),
    }
    summary["dropped"] = {
        "unknown_item_interactions": unknown,
        **dropped,
        "users": raw_users - users,
        "items": raw_items - items,
    }
    summary["filters"] = asdict(filters)
    summary["split"] = {
        "new_items": split_options.new_items,
        "new_item_count": len(new_items),
        "new_item_idx": new_items.tolist(),
        "new_test_targets": int(np.isin(item_idx[split == "test"], new_items).sum()),
        "held_out_interactions": held_out,
        "dropped_users": users_before - len(user_ids),  # left too short to split once new items went
    }
    if refinement is not None:
        summary["text_refine"] = refinement.summary
    if text.enabled:
        embedded = text_modality(refinement.texts if refinement else texts, text)
        result.embeddings["text"] = (embedded.matrix, embedded.present)
        summary["text"] = embedded.summary
    else:
        summary["text"] = {"enabled": False}
    vectors = image_modality(raw, item_ids, images, image, texts)
    if vectors is not None:
        result.embeddings["image"] = (vectors.matrix, vectors.present)
        summary["image"] = vectors.summary
    result.summary = summary
    return result


def refined_texts(texts: list[str | None], options: TextOptions, seed: int) -> Refinement | None:
    """The items' texts rewritten by ``text.refine``'s model, or None when it is off. Refused when no item has
    text, whether or not text embeddings are on: there would be nothing to refine."""
    if not options.refine.enabled:
        return None
    if all(text is None for text in texts):
        raise InputError("text.refine.enabled: no item has text to refine (no items table, or empty text columns); "
                         "set text.refine.enabled false")
    return refine_texts(texts, options.refine, seed, options.cache_dir)


def image_references(raw: RawData, item_ids: list[str]) -> list[str | None]:
    """Each item's image path or URL from the source's image column; ``None`` where blank or absent."""
    if raw.items is None or raw.image_column is None:
        return [None] * len(item_ids)
    values = raw.items[raw.image_column].reindex(item_ids)
    return [str(value).strip() if isinstance(value, str) and value.strip() else None for value in values]
