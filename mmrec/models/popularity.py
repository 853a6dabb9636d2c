"""Most-popular baseline: every user gets the catalog ranked by training-set interaction counts.

It is the floor every sequential model must clear. It learns nothing beyond counting, so it has no
training stage and no weights file: ``mmrec test --model popularity`` counts the training split of the
run's prepared interactions (the same split SASRec trains on; validation and test items are never
counted). Items with equal counts tie, and ties are ranked pessimistically.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class Popularity(nn.Module):
    """Scores each item by its training interaction count, the same for every user."""

    def __init__(self, counts: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float32))

    def score_batch(self, batch: dict[str, Tensor]) -> Tensor:
        return self.counts.expand(len(batch["user_idx"]), -1)

