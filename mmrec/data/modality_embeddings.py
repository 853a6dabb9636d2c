"""Each content modality's embedding matrix for the prepared items, with the figures ``prepare`` reports.

Text embeddings come from the rendered item texts; image embeddings from a precomputed file, an encoder
run on the items' image references, or vectors the source brings itself (the synthetic catalog). Either
way the result is one row per prepared item plus the explicit ``present`` mask, and an all-absent
modality is an error rather than a silently useless matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmrec.data.image_embeddings import ImageOptions, encode_images
from mmrec.data.precomputed import align, load_precomputed
from mmrec.data.sources import RawData
from mmrec.data.text_embeddings import TextOptions, embed_texts
from mmrec.errors import InputError


@dataclass(frozen=True)
class ModalityMatrix:
    """``matrix [N, d]`` (zeros where absent), ``present [N]``, and the summary recorded in the manifest."""

    matrix: np.ndarray
    present: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


def text_modality(texts: list[str | None], options: TextOptions) -> ModalityMatrix:
    """Embed the items' rendered texts; items without text are masked."""
    if all(text is None for text in texts):
        raise InputError("no item has text (no items table, or empty text columns); set text.enabled false")
    embedded = embed_texts(texts, options)
    summary = {
        "enabled": True,
        "model": embedded.model,
        "dim": int(embedded.matrix.shape[1]),
        "present": int(embedded.present.sum()),
        "missing": int((~embedded.present).sum()),
        "cache_hit": embedded.cache_hit,
        "cache_file": str(embedded.cache_file) if embedded.cache_file else None,
    }
    return ModalityMatrix(embedded.matrix, embedded.present, summary)


def image_modality(
    raw: RawData, item_ids: list[str], references: list[str | None], options: ImageOptions | None,
    texts: list[str | None] | None = None,
) -> ModalityMatrix | None:
    """From ``image.precomputed``, ``image.encoder``/``hf_model`` (whose ``preprocess`` hook sees the items'
    ``texts``), or the source's own vectors; else none."""
    unreadable = 0
    if options is not None and options.precomputed:
        origin = options.precomputed
        vectors = load_precomputed(options.precomputed, options.id_column, options.embedding_column)
        matrix, present = align(vectors, item_ids, origin, options.dim)
    elif options is not None:
        origin = "encoder"
        if raw.image_column is None:
            raise InputError("image.encoder is set, but the source names no image column (source.image_column)")
        if all(reference is None for reference in references):
            raise InputError(f"no item has an image: column '{raw.image_column}' of {raw.items_name} is empty")
        encoded = encode_images(references, item_ids, options, texts)
        matrix, present, unreadable = encoded.matrix, encoded.present, encoded.unreadable
    elif raw.image_embeddings is not None:
        origin = "source"
        matrix, present = align(raw.image_embeddings, item_ids, "source image vectors")
    else:
        return None
    if not present.any():
        raise InputError(
            f"{origin}: no item has an image embedding; do its item ids match the source's "
            f"(e.g. '{item_ids[0]}')?"
        )
    summary = {
        "origin": origin,
        "dim": int(matrix.shape[1]),
        "present": int(present.sum()),
        "missing": int((~present).sum()),
        "unreadable": unreadable,
    }
    return ModalityMatrix(matrix, present, summary)
