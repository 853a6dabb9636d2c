"""Frequency-aware fusion (MME-SID): several scorers over the whole catalog, mixed per item by weights
that depend on how popular the item is.

For the user representation ``h`` and item ``i`` with ``f_i = log(1 + training count of i)``::

    logit_i = w_head(f_i) * (W_head h)_i + sum_m w_m(f_i) * <P_m h, e_m(i)>

``w(f) = softmax(MLP(f))`` over the scorers. The linear head memorises frequent items well; the dot products
with frozen content/collaborative embeddings generalise to rare ones, and the MLP learns where each wins.
A modality in which item ``i`` has no embedding gets weight 0 for that item (the rest renormalised); so does
the head for an item never seen in training (a new item), whose row is untrained.
Scores are computed in float32 even under bf16 autocast, so that 12k logits keep distinct values.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

HEAD = "head"
COLLABORATIVE = (HEAD, "collab")


class FrequencyAwareFusion(nn.Module):
    """``h [B, H] -> logits [B, N]``.

    Args:
        hidden: the backbone's hidden size.
        item_counts: training interactions per item ``[N]``.
        tables: raw embedding matrix ``[N, d_m]`` of each modality used as a scorer; frozen.
        present: ``[N]`` bool per modality in ``tables`` (False: the item has no embedding there).
        use_head: include the linear head over all items.
        mlp_hidden: hidden width of the weight MLP.
    """

    def __init__(
        self,
        hidden: int,
        item_counts: Tensor,
        tables: Mapping[str, Tensor],
        present: Mapping[str, Tensor],
        use_head: bool = True,
        mlp_hidden: int = 16,
    ) -> None:
        super().__init__()
        num_items = len(item_counts)
        self.scorers = ([HEAD] if use_head else []) + list(tables)
        if not self.scorers:
            raise ValueError("fusion needs at least one scorer: the head or a modality")
        self.head = nn.Linear(hidden, num_items) if use_head else None
        self.modalities = list(tables)
        for name, table in tables.items():
            self.register_buffer(f"table_{name}", table.float(), persistent=False)
        self.projections = nn.ModuleDict({name: nn.Linear(hidden, table.shape[1], bias=False) for name, table in tables.items()})
        log_freq = torch.log1p(item_counts.float())
        std = log_freq.std().clamp(min=1e-6) if num_items > 1 else torch.tensor(1.0)
        self.register_buffer("frequency", ((log_freq - log_freq.mean()) / std).unsqueeze(-1), persistent=False)
        # which scorers have something for each item: the head for all, a modality where the item has it
        available = ([torch.ones(num_items, dtype=torch.bool)] if use_head else []) + [present[name].bool() for name in tables]
        self.register_buffer("available", torch.stack(available, dim=-1), persistent=False)
        self.register_buffer("trained", item_counts > 0, persistent=False)
        # the scorers an item never seen in training lacks: the head (its row is untrained) and SASRec's collab
        # embedding (exported absent for it); such an item is scored by its content alone (see weights)
        self.register_buffer("collaborative", torch.tensor([name in COLLABORATIVE for name in self.scorers]), persistent=False)
        self.weight_mlp = nn.Sequential(nn.Linear(1, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, len(self.scorers)))
        # Start from equal weights: the last layer at zero makes softmax uniform over each item's scorers.
        nn.init.zeros_(self.weight_mlp[-1].weight)
        nn.init.zeros_(self.weight_mlp[-1].bias)

    def table(self, name: str) -> Tensor:
        return getattr(self, f"table_{name}")

    def weights(self, as_unseen: Tensor | None = None) -> Tensor:
        """Per-item scorer weights ``[N, S]``; rows sum to 1 over the scorers available for that item.

        An item never seen in training, and each item of ``as_unseen`` (``[N]`` bool), is weighed without the
        head and the collab scorer, by its content alone; an item without content keeps them (some scorer must
        remain).
        """
        unseen = ~self.trained if as_unseen is None else ~self.trained | as_unseen
        content = self.available & ~(unseen[:, None] & self.collaborative[None, :])
        allowed = torch.where(content.any(dim=-1, keepdim=True), content, self.available)
        logits = self.weight_mlp(self.frequency).masked_fill(~allowed, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def scores(self, hidden: Tensor) -> Tensor:
        """Each scorer's logits, ``[S, B, N]``."""
        parts = [self.head(hidden)] if self.head is not None else []
        parts += [self.projections[name](hidden) @ self.table(name).T for name in self.modalities]
        return torch.stack(parts)

    def seen_only(self, logits: Tensor) -> Tensor:
        """``logits [..., N]`` with every item never seen in training at ``-inf``: the training softmax of a catalog
        as it was when training ran. Such an item (a new one) would otherwise be a negative of every training
        sample and be pushed below every item its content resembles, the very items it should rank beside."""
        return logits.masked_fill(~self.trained, float("-inf"))

    def forward(self, hidden: Tensor, as_unseen: Tensor | None = None) -> Tensor:
        """Logits ``[B, N]``; ``as_unseen`` scores those items by content alone (see :meth:`weights`)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            hidden = hidden.float()
            return torch.einsum("sbn,ns->bn", self.scores(hidden), self.weights(as_unseen))
