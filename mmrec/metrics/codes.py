"""How good a set of semantic-ID codes is, independent of the model that produced them.

Shared by the quantizer's training logs (``fit-quantizer``) and the SID quality report (``assign-sids``),
so both report the same numbers. Inputs may be torch tensors or numpy arrays; results are plain Python
floats (JSON-ready). ``codes`` is always ``[N, L]``: one row per item, one column per level.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _level_counts(codes: ArrayLike, codebook_size: int) -> np.ndarray:
    codes = _numpy(codes).astype(np.int64)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [N, L], got shape {codes.shape}")
    return np.stack([np.bincount(codes[:, level], minlength=codebook_size) for level in range(codes.shape[1])])


def code_utilisation(codes: ArrayLike, codebook_size: int) -> list[float]:
    """Per level, the fraction of the ``codebook_size`` codes that at least one item uses."""
    return [float(x) for x in (_level_counts(codes, codebook_size) > 0).mean(1)]


def code_perplexity(codes: ArrayLike, codebook_size: int) -> list[float]:
    """Per level, ``exp(entropy)`` of the code distribution: the number of equally used codes it equals.

    ``codebook_size`` for perfectly balanced use, 1 for collapse; a level can use every code (utilisation
    1.0) and still have low perplexity when most items crowd onto a few of them.
    """
    counts = _level_counts(codes, codebook_size).astype(np.float64)
    probs = counts / counts.sum(1, keepdims=True).clip(min=1)
    entropy = -(probs * np.log(np.where(probs > 0, probs, 1.0))).sum(1)
    return [float(x) for x in np.exp(entropy)]


def unique_tuple_fraction(codes: ArrayLike) -> float:
    """Fraction of items whose full code tuple no other item shares (1.0: no collisions at all)."""
    codes = _numpy(codes)
    if len(codes) == 0:
        return float("nan")
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.reshape(-1)] == 1).mean())


def reconstruction_cosine(inputs: ArrayLike, reconstructions: ArrayLike) -> float:
    """Mean cosine similarity between each item's input vector and its reconstruction."""
    a = torch.as_tensor(_numpy(inputs), dtype=torch.float64)
    b = torch.as_tensor(_numpy(reconstructions), dtype=torch.float64)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


def sample_pairs(num_items: int, num_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``num_pairs`` uniformly random item pairs ``(i, j)`` with ``i != j`` (fixed by ``seed``)."""
    if num_items < 2:
        raise ValueError("need at least two items to form a pair")
    rng = np.random.default_rng(seed)
    first = rng.integers(num_items, size=num_pairs)
    second = (first + rng.integers(1, num_items, size=num_pairs)) % num_items
    return first, second


def kendall_tau_distances(original: ArrayLike, other: ArrayLike, num_pairs: int = 100_000, seed: int = 0) -> float:
    """Kendall's tau between Euclidean distances of the same sampled item pairs in two spaces.

    ``original [N, d]`` and ``other [N, d']`` hold the same items in the same row order (for example the
    input embeddings and the sums of the items' code vectors). 1.0: the second space orders every pair
    of pairs as the first does; 0: no relation (MME-SID's measure of how much distance information a
    representation keeps).
    """
    a, b = _numpy(original).astype(np.float64), _numpy(other).astype(np.float64)
    if len(a) != len(b):
        raise ValueError(f"original has {len(a)} rows, other has {len(b)}")
    i, j = sample_pairs(len(a), num_pairs, seed)
    da = np.linalg.norm(a[i] - a[j], axis=1)
    db = np.linalg.norm(b[i] - b[j], axis=1)
    return float(kendalltau(da, db).statistic)
