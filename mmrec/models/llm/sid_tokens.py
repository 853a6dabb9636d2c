"""Semantic-ID tokens for the generative head: one token per (level, code), added to the backbone's
tokenizer and embedding matrix, and their initial embeddings.

An item with SID ``(12, 200, 3, 0)`` reads ``<a_12><b_200><c_3><d_0>``: the letter names the level (the
quantizer's levels, then ``assign-sids``' disambiguation level when it added one), so the same code at two
levels is two different tokens, as in TIGER and LC-Rec. Token rows are level-major: all of level ``a``, then
all of level ``b``, and so on; ``offsets[l] + code`` indexes a token within that block.

Initialisation (``code_init``):

- ``codebook``: level ``l``'s rows are the quantizer's codebook ``C_l`` mapped by one fixed map ``x -> s x P``
  to the hidden size, with ``P [D, H]`` orthonormal rows (the identity when ``D == H``), so inner products and
  distances between code vectors are kept exactly, up to the common scale ``s`` that gives the rows the
  backbone's mean token-embedding norm. A disambiguation level has no codebook; its rows are random.
- ``random``: every row random at that same norm (the ablation that forgets the quantizer's geometry).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmrec.errors import InputError

LEVEL_LETTERS = string.ascii_lowercase


def token_string(level: int, code: int) -> str:
    """``<a_12>`` for code 12 of the first level."""
    return f"<{LEVEL_LETTERS[level]}_{code}>"


@dataclass(frozen=True)
class SIDVocabulary:
    """The catalog's SIDs and the token block they need.

    Attributes:
        codes: ``[N, L]`` code of each item at each level; a row of ``-1`` for an item without an SID.
        level_sizes: number of tokens of each level.
    """

    codes: Tensor
    level_sizes: tuple[int, ...]

    @classmethod
    def from_codes(cls, codes: Tensor, codebooks: list[Tensor], source: str) -> SIDVocabulary:
        """Check ``assign-sids``' codes (``source`` names them in errors) and size each level.

        Quantizer levels take their codebook's size; a disambiguation level takes its largest code + 1.
        The generative head decodes SIDs back to items, so they must be unique.
        """
        has_sid = (codes >= 0).all(dim=1)
        if not bool(has_sid.any()):
            raise InputError(f"{source}: no item has an SID")
        levels = codes.shape[1]
        if levels > len(LEVEL_LETTERS):
            raise InputError(f"{source}: {levels} SID levels; the generative head names at most {len(LEVEL_LETTERS)}")
        known = codes[has_sid]
        sizes = [
            int(codebooks[level].shape[0]) if level < len(codebooks) else int(known[:, level].max()) + 1
            for level in range(levels)
        ]
        for level, size in enumerate(sizes):
            if int(known[:, level].max()) >= size:
                raise InputError(f"{source}: level {level} has code {int(known[:, level].max())}, beyond its codebook of {size}")
        unique, counts = torch.unique(known, dim=0, return_counts=True)
        if len(unique) < len(known):
            shared = unique[counts > 1][0]
            items = torch.nonzero((codes == shared).all(dim=1)).flatten()[:2].tolist()
            raise InputError(
                f"{source}: {int((counts[counts > 1]).sum())} items share an SID (e.g. items {items[0]} and {items[1]}); "
                "the generative head decodes SIDs to items, so they must be unique: run assign-sids with "
                "model.collisions suffix or reassign"
            )
        total = 1
        for size in sizes:
            total *= size
        if total >= 2**62:
            raise InputError(f"{source}: the SID space ({' x '.join(map(str, sizes))}) is too large to index")
        return cls(codes=codes, level_sizes=tuple(sizes))

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def offsets(self) -> list[int]:
        """Index of each level's first token within the SID token block."""
        starts, total = [], 0
        for size in self.level_sizes:
            starts.append(total)
            total += size
        return starts

    @property
    def num_tokens(self) -> int:
        return sum(self.level_sizes)

    def token_strings(self) -> list[str]:
        return [token_string(level, code) for level, size in enumerate(self.level_sizes) for code in range(size)]

    def item_token_rows(self) -> Tensor:
        """``[N, L]`` each item's tokens as indices into the SID block (``-1`` for items without an SID)."""
        rows = self.codes + torch.tensor(self.offsets, dtype=torch.long)
        return torch.where(self.codes >= 0, rows, -1)


def add_sid_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, vocab: SIDVocabulary) -> Tensor:
    """Add the SID tokens to ``tokenizer`` and ``model``'s embeddings; return their ids (level-major).

    Tokens the tokenizer already has (a backbone saved with them) are reused. Each token must encode to
    exactly its own id, so that prompts written as text read the same as the ids mmrec builds.
    """
    strings = vocab.token_strings()
    tokenizer.add_tokens(strings)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(strings)
    for text, token in zip(strings[:1] + strings[-1:], ids[:1] + ids[-1:]):
        if tokenizer(text, add_special_tokens=False)["input_ids"] != [token]:
            raise InputError(f"the backbone's tokenizer does not encode the SID token {text} as one token")
    return torch.tensor(ids, dtype=torch.long)


def orthonormal_map(dim: int, hidden: int, generator: torch.Generator) -> Tensor:
    """``[dim, hidden]`` with orthonormal rows when ``dim <= hidden`` (identity when equal): keeps inner products.

    Wider codes than the hidden size cannot keep them; they get orthonormal columns (a projection).
    """
    if dim == hidden:
        return torch.eye(dim)
    gaussian = torch.randn(max(dim, hidden), min(dim, hidden), generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(gaussian)  # orthonormal columns
    return (basis.T if dim < hidden else basis).float()


def initial_token_embeddings(
    vocab: SIDVocabulary,
    codebooks: list[Tensor],
    reference: Tensor,
    init: Literal["codebook", "random"],
    seed: int = 0,
) -> tuple[Tensor, Tensor, float]:
    """Rows for the SID tokens ``[num_tokens, H]``, the map ``P`` and scale ``s`` used (see module docstring).

    ``reference``: the backbone's existing embedding matrix, whose mean row norm the new rows take.
    """
    generator = torch.Generator().manual_seed(seed)
    hidden = reference.shape[1]
    target_norm = float(reference.float().norm(dim=1).mean())
    rows = torch.randn(vocab.num_tokens, hidden, generator=generator)
    rows = rows / rows.norm(dim=1, keepdim=True) * target_norm
    dim = int(codebooks[0].shape[1]) if codebooks else hidden
    projection = orthonormal_map(dim, hidden, generator)
    if init == "random" or not codebooks:
        return rows, projection, 1.0
    books = [book.float() for book in codebooks[: vocab.num_levels]]
    scale = target_norm / float(torch.cat(books).norm(dim=1).mean().clamp(min=1e-12))
    for level, book in enumerate(books):
        start = vocab.offsets[level]
        rows[start:start + len(book)] = scale * book @ projection
    return rows, projection, scale
