"""Embedding an item through its semantic ID, the way the recommenders consume SIDs.

An SID embedding is a sum of table rows, one row for each *n-gram* of the item's code tuple
``(c1, ..., cL)``. The scheme chooses the n-grams:

========================  ==================================================  ==========================
scheme                    n-grams of ``(c1, ..., cL)``                         source
========================  ==================================================  ==========================
``sum``                   ``(c1)``, ``(c2)``, ..., ``(cL)`` (one per level)    MME-SID's code embeddings
``prefix_ngram``          ``(c1)``, ``(c1,c2)``, ..., ``(c1..cL)``             Meta, RecSys 2025
``all_bigrams``           ``(c1,c2)``, ``(c2,c3)``, ..., ``(cL-1,cL)``         Meta's comparison
``full_tuple``            ``(c1..cL)`` (one id for the whole SID)              Meta's comparison
========================  ==================================================  ==========================

An n-gram is identified by its levels *and* its values, so ``(c1=3)`` and ``(c2=3)`` are different rows.
Row ids (see :func:`ngram_ids`): with ``table_size=None`` every distinct n-gram occurring in ``codes`` gets
its own row (no collisions, no unused rows). With ``table_size=T``, an n-gram's id is its exact index in
the full id space (``sum`` over n-grams of ``prod K_l``) when that space fits in ``T``, and otherwise a
64-bit hash of (n-gram, values) modulo ``T``: Meta's fixed-size hashed table, where unrelated n-grams
may share a row.

Initialisation (``init``):

- ``codebook`` (MME-SID): every level's codebook vector ``e_l[c_l]`` is split equally among the n-grams that
  contain level ``l``, and an n-gram's row is the sum of its shares. So for *every* scheme the initial SID
  embedding of an item equals ``P(e_1[c1] + ... + e_L[cL])``, the RQ-VAE's quantized vector, where ``P``
  is a trainable ``nn.Linear(D, dim, bias=False)`` when the codebook width ``D`` differs from ``dim`` and the
  identity otherwise (a linear map commutes with the sum, so projecting rows or the sum is the same). In
  particular a ``prefix_ngram`` row ``(c1..cl)`` starts as ``sum_{i<=l} e_i[c_i] / (L - i + 1)``; a
  ``full_tuple`` row starts as the quantized vector itself. Levels without a codebook (the ``suffix``
  disambiguation level) contribute zero at first, so colliding items start equal and are separated by
  training. Under hashing, a row shared by several n-grams starts as the mean over the items using it.
- ``random`` (the ablation MME-SID shows loses most distance information): tables of width ``dim``,
  ``N(0, 1)`` rows (PyTorch's ``nn.Embedding`` default), no projection.

Items without an SID in the modality (rows of ``-1`` in ``codes``) embed to the zero vector; ``present``
flags them so the caller can mask them.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import nn

Scheme = Literal["sum", "prefix_ngram", "all_bigrams", "full_tuple"]
SCHEMES: tuple[str, ...] = ("sum", "prefix_ngram", "all_bigrams", "full_tuple")


def ngram_levels(scheme: Scheme, num_levels: int) -> list[tuple[int, ...]]:
    """The level positions of each n-gram a scheme embeds, e.g. ``prefix_ngram``, L=3: (0,), (0,1), (0,1,2)."""
    if scheme == "sum":
        return [(level,) for level in range(num_levels)]
    if scheme == "prefix_ngram":
        return [tuple(range(level + 1)) for level in range(num_levels)]
    if scheme == "all_bigrams":
        if num_levels < 2:
            raise ValueError("all_bigrams needs SIDs of at least two levels")
        return [(level, level + 1) for level in range(num_levels - 1)]
    if scheme == "full_tuple":
        return [tuple(range(num_levels))]
    raise ValueError(f"unknown SID embedding scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a well-mixed, platform-independent 64-bit hash (unlike Python's ``hash``)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def ngram_ids(
    codes: np.ndarray,
    ngrams: list[tuple[int, ...]],
    table_size: int | None = None,
    level_sizes: list[int] | None = None,
) -> tuple[np.ndarray, int, bool]:
    """Row ids ``[N, G]`` of each item's G n-grams, the number of rows, and whether ids were hashed.

    ``codes [N, L]`` must hold valid codes only (drop rows without an SID first). ``level_sizes`` (K per
    level) defines the exact id space; it is needed only when ``table_size`` is given.
    """
    codes = np.asarray(codes, dtype=np.int64)
    ids = np.zeros((len(codes), len(ngrams)), dtype=np.int64)
    if table_size is None:
        offset = 0
        for g, levels in enumerate(ngrams):
            values = codes[:, list(levels)]
            if len(values) == 0:
                continue
            distinct, inverse = np.unique(values, axis=0, return_inverse=True)
            ids[:, g] = offset + inverse.reshape(-1)
            offset += len(distinct)
        return ids, max(offset, 1), False
    if table_size < 1:
        raise ValueError(f"table_size must be positive, got {table_size}")
    if level_sizes is None:
        raise ValueError("level_sizes is needed to compare the id space with table_size")
    space = sum(math.prod(level_sizes[level] for level in levels) for levels in ngrams)
    if space <= table_size:
        offset = 0
        for g, levels in enumerate(ngrams):
            index = np.zeros(len(codes), dtype=np.int64)
            for level in levels:
                index = index * level_sizes[level] + codes[:, level]
            ids[:, g] = offset + index
            offset += math.prod(level_sizes[level] for level in levels)
        return ids, table_size, False
    for g, levels in enumerate(ngrams):
        state = _splitmix64(np.full(len(codes), g + 1, dtype=np.uint64))
        for level in levels:
            state = _splitmix64(state ^ codes[:, level].astype(np.uint64))
        ids[:, g] = (state % np.uint64(table_size)).astype(np.int64)
    return ids, table_size, True


class SIDEmbedding(nn.Module):
    """Embed items by their semantic IDs in one modality (see the module docstring for the schemes).

    Args:
        codes: ``LongTensor [N, L]``, row ``i`` = item ``i``'s code tuple, all ``-1`` where it has no SID.
        dim: output width.
        scheme: which n-grams of the tuple get a row: ``sum``, ``prefix_ngram``, ``all_bigrams``, ``full_tuple``.
        codebooks: per level ``[K_l, D]``, the quantizer's codebooks (``load_sids`` returns them); may cover
            fewer levels than ``codes`` (a suffix level has none). Required when ``init == "codebook"``;
            also gives K_l for the id space.
        init: ``codebook`` (rows from the codebooks, so the initial embedding is the quantized vector) or
            ``random``.
        table_size: ``None`` for one row per distinct n-gram; an int for a fixed table (hashed if needed).
        codebook_size: K for levels without a codebook in ``codebooks`` (default: largest code + 1).
    """

    def __init__(
        self,
        codes: torch.Tensor,
        dim: int,
        scheme: Scheme = "sum",
        codebooks: list[torch.Tensor] | None = None,
        init: Literal["codebook", "random"] = "codebook",
        table_size: int | None = None,
        codebook_size: int | None = None,
    ) -> None:
        super().__init__()
        codes_np = _check_codes(codes)
        if init not in ("codebook", "random"):
            raise ValueError(f"init must be 'codebook' or 'random', got {init!r}")
        if init == "codebook" and not codebooks:
            raise ValueError("init='codebook' needs the codebooks (load_sids returns them)")
        codebooks = [cb.detach().float().cpu() for cb in (codebooks or [])]
        num_levels = codes_np.shape[1]
        if len(codebooks) > num_levels:
            raise ValueError(f"{len(codebooks)} codebooks for SIDs of {num_levels} levels")
        present = (codes_np >= 0).all(axis=1)
        valid = codes_np[present]
        self.level_sizes = _level_sizes(valid, codebooks, codebook_size, num_levels)
        self.scheme, self.init, self.dim = scheme, init, dim
        self.ngrams = ngram_levels(scheme, num_levels)
        ids_valid, num_rows, self.hashed = ngram_ids(valid, self.ngrams, table_size, self.level_sizes)
        ids = np.zeros((len(codes_np), len(self.ngrams)), dtype=np.int64)
        ids[present] = ids_valid
        self.register_buffer("ngram_ids", torch.from_numpy(ids))
        self.register_buffer("present", torch.from_numpy(present))
        if init == "random":
            self.table = nn.Embedding(num_rows, dim)
            self.project: nn.Module = nn.Identity()
        else:
            width = codebooks[0].shape[1]
            self.table = nn.Embedding(num_rows, width)
            with torch.no_grad():
                self.table.weight.copy_(_codebook_rows(valid, ids_valid, num_rows, self.ngrams, codebooks))
            self.project = nn.Linear(width, dim, bias=False) if width != dim else nn.Identity()

    @property
    def num_rows(self) -> int:
        return self.table.num_embeddings

    def forward(self, item_idx: torch.Tensor) -> torch.Tensor:
        """``item_idx [...]`` -> ``[..., dim]``; zero for items without an SID."""
        rows = self.table(self.ngram_ids[item_idx]).sum(dim=-2)
        return self.project(rows) * self.present[item_idx].unsqueeze(-1).to(rows.dtype)

    def mask(self, item_idx: torch.Tensor) -> torch.Tensor:
        """``item_idx [...]`` -> ``bool [...]``: True where the item has an SID in this modality."""
        return self.present[item_idx]


def _check_codes(codes: torch.Tensor) -> np.ndarray:
    array = torch.as_tensor(codes).detach().cpu().numpy()
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"codes must be [N, L] with L >= 1, got shape {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"codes must be integers, got {array.dtype}")
    negative = array < 0
    partial = negative.any(axis=1) & ~negative.all(axis=1)
    if partial.any():
        raise ValueError(f"item {int(np.flatnonzero(partial)[0])}: codes mix -1 with codes; -1 must fill a whole row")
    return array.astype(np.int64)


def _level_sizes(
    valid: np.ndarray, codebooks: list[torch.Tensor], codebook_size: int | None, num_levels: int
) -> list[int]:
    sizes = []
    for level in range(num_levels):
        largest = int(valid[:, level].max()) + 1 if len(valid) else 1
        if level < len(codebooks):
            size = int(codebooks[level].shape[0])
        else:
            size = codebook_size if codebook_size is not None else largest
        if largest > size:
            raise ValueError(f"level {level} holds code {largest - 1}, but that level has only {size} codes")
        sizes.append(size)
    return sizes


def _codebook_rows(
    valid: np.ndarray, ids: np.ndarray, num_rows: int, ngrams: list[tuple[int, ...]], codebooks: list[torch.Tensor]
) -> torch.Tensor:
    """Rows such that each item's summed n-gram rows equal the sum of its codebook vectors.

    Level l's vector is split equally among the ``m_l`` n-grams containing level l; a row used by several
    items (or, under hashing, by several n-grams) gets the mean of their shares.
    """
    width = codebooks[0].shape[1]
    if any(cb.shape[1] != width for cb in codebooks):
        raise ValueError(f"codebooks differ in width: {[tuple(cb.shape) for cb in codebooks]}")
    shares = {level: sum(level in levels for levels in ngrams) for level in range(len(codebooks))}
    codes = torch.from_numpy(valid)
    total = torch.zeros(num_rows, width)
    count = torch.zeros(num_rows)
    for g, levels in enumerate(ngrams):
        value = torch.zeros(len(codes), width)
        for level in levels:
            if level < len(codebooks):
                value += codebooks[level][codes[:, level]] / shares[level]
        row = torch.from_numpy(ids[:, g])
        total.index_add_(0, row, value)
        count.index_add_(0, row, torch.ones(len(codes)))
    return total / count.clamp(min=1).unsqueeze(1)

