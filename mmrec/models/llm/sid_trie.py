"""Beam search over semantic IDs, constrained by a prefix trie of the catalog's SIDs.

The trie is stored as tensors, so a whole batch of beams is constrained in a few vectorised operations on
the model's device: a prefix ``(c_0, ..., c_{d-1})`` is one integer key in mixed radix
(``key = ((c_0 * S_1) + c_1) * S_2 + ...``); for each depth ``d`` the trie keeps the sorted keys of the
catalog's prefixes of length ``d`` and, for each, a mask of the codes that may follow. A beam's allowed next
codes are one ``searchsorted`` and one row gather away.

Every live beam therefore extends a real prefix, every finished beam is a real item, and distinct beams are
distinct items (SIDs are unique). A beam runs out only when fewer SIDs than beams exist under the prefixes
kept; its score is then ``-inf`` and its item ``-1`` (an empty slot), never a made-up item. A live beam
without any allowed continuation cannot happen by construction; if it did, the search raises instead of
returning it.

A beam's score is, by default, the model's log-probability of the SID: at each level a log-softmax over all of
that level's codes, the codes the trie forbids masked out of the choice but not out of the normalisation
(TIGER's decoding). With ``renormalize`` each level's log-probs are normalised again over the codes the trie
allows after the beam's prefix, so a score is the SID's probability among the catalog's SIDs: a level with one
allowed code (a prefix that already names one item: the deeper levels and the disambiguation suffix of most
items) costs nothing, where by default it costs whatever mass the model gives the other codes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mmrec.errors import MMRecError

StepFn = Callable[[int, Tensor | None, Tensor | None], Tensor]
"""``step(depth, origin, codes) -> log-probs [B, beams, S_depth]`` over the codes of level ``depth``.

``origin [B, beams]`` is, for each new beam, the index of the beam it extends among the previous step's
beams, and ``codes [B, beams]`` the code it appended (both None at depth 0, where each user has one beam:
the prompt). The model reads ``codes`` as the next input tokens, each continuing the sequence of the beam
``origin`` names (the generative head keeps one cache row per user and tracks each beam's ancestors)."""


class SIDTrie(nn.Module):
    """Prefix trie of ``codes [N, L]`` (rows of ``-1``: items without an SID, left out).

    Args:
        codes: each item's SID.
        level_sizes: number of codes at each level.
    """

    def __init__(self, codes: Tensor, level_sizes: tuple[int, ...] | list[int]) -> None:
        super().__init__()
        self.level_sizes = tuple(int(size) for size in level_sizes)
        items = torch.nonzero((codes >= 0).all(dim=1)).flatten()
        known = codes[items].long()
        key = torch.zeros(len(items), dtype=torch.long)
        for depth, size in enumerate(self.level_sizes):
            prefixes, row = torch.unique(key, return_inverse=True)  # sorted
            allowed = torch.zeros(len(prefixes), size, dtype=torch.bool)
            allowed[row, known[:, depth]] = True
            self.register_buffer(f"prefixes_{depth}", prefixes, persistent=False)
            self.register_buffer(f"allowed_{depth}", allowed, persistent=False)
            key = key * size + known[:, depth]
        order = torch.argsort(key)
        self.register_buffer("item_keys", key[order], persistent=False)
        self.register_buffer("item_of_key", items[order], persistent=False)

    @property
    def depth(self) -> int:
        return len(self.level_sizes)

    def _lookup(self, sorted_keys: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Row of each key in ``sorted_keys`` and whether it is there."""
        row = torch.searchsorted(sorted_keys, keys).clamp(max=len(sorted_keys) - 1)
        return row, sorted_keys[row] == keys

    def allowed(self, depth: int, keys: Tensor, live: Tensor) -> Tensor:
        """``[..., S_depth]`` codes that may follow each prefix key; all False for dead beams.

        Raises if a live beam's prefix is not in the trie or has no continuation.
        """
        row, found = self._lookup(getattr(self, f"prefixes_{depth}"), keys)
        mask = getattr(self, f"allowed_{depth}")[row] & (found & live).unsqueeze(-1)
        if bool((live & ~mask.any(dim=-1)).any()):
            raise MMRecError(f"constrained decoding: a live beam has no valid continuation at SID level {depth}")
        return mask

    def child(self, keys: Tensor, depth: int, codes: Tensor) -> Tensor:
        return keys * self.level_sizes[depth] + codes

    def items(self, keys: Tensor) -> Tensor:
        """The item each full-SID key names, ``-1`` where none does."""
        row, found = self._lookup(self.item_keys, keys)
        return torch.where(found, self.item_of_key[row], -1)

    def key_of(self, codes: Tensor) -> Tensor:
        """Full-SID keys of ``codes [..., L]``."""
        key = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for depth, size in enumerate(self.level_sizes):
            key = key * size + codes[..., depth]
        return key


def constrained_beam_search(
    step: StepFn, trie: SIDTrie, batch_size: int, num_beams: int, device: torch.device, renormalize: bool = False
) -> tuple[Tensor, Tensor]:
    """Best ``num_beams`` SIDs per user under ``step``'s log-probs, restricted to the catalog's SIDs.

    Returns ``(items [B, num_beams], scores [B, num_beams])`` best first; a beam's score is the sum of its
    codes' log-probs (with ``renormalize``, each normalised over the codes the trie allows after its prefix);
    empty slots (fewer SIDs than beams) hold item ``-1`` and score ``-inf``.
    """
    scores = torch.zeros(batch_size, 1, device=device)
    keys = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    origin = codes = None
    for depth in range(trie.depth):
        logprobs = step(depth, origin, codes).float()
        size = logprobs.shape[-1]
        allowed = trie.allowed(depth, keys, torch.isfinite(scores))
        logprobs = logprobs.masked_fill(~allowed, -torch.inf)
        if renormalize:  # a dead beam allows nothing: its -inf stays, never a NaN
            total = torch.logsumexp(logprobs, dim=-1, keepdim=True)
            logprobs = logprobs - total.masked_fill(torch.isinf(total), 0.0)
        candidates = (scores.unsqueeze(-1) + logprobs).flatten(1)
        if candidates.shape[1] < num_beams:  # fewer candidates than beams: pad with empty ones
            candidates = nn.functional.pad(candidates, (0, num_beams - candidates.shape[1]), value=-torch.inf)
        scores, index = candidates.topk(num_beams, dim=1)
        origin, codes = (index // size).clamp(max=keys.shape[1] - 1), index % size
        keys = trie.child(keys.gather(1, origin), depth, codes)
    items = trie.items(keys)
    live = torch.isfinite(scores)
    return torch.where(live, items, -1), scores
