"""Residual vector quantization: L codebooks of K codes, each quantizing what the previous levels left.

Why each piece is here:

* **Straight-through estimator.** ``argmin`` has no gradient; the decoder's gradient is passed to the
  encoder as if quantization were the identity, and the codebooks learn only through the codebook loss.
* **k-means initialisation** on the encoded table (level by level, each on the residuals the previous
  levels leave) starts every code where data is, so no code begins dead.
* **Dead-code re-seeding.** The encoder moves during training and codes that no item picks any more never
  receive a gradient again. Codes that were no training item's nearest code over an epoch are moved onto
  random residuals that the level saw in that epoch (a ring buffer of recent training residuals), which is
  what keeps utilisation near 100%.
* **Sinkhorn balancing** (optional, last level, training only). The last level quantizes small, crowded
  residuals, where nearest-code assignment piles many items onto few codes and so makes their tuples
  collide. A balanced (optimal-transport) assignment within the batch spreads them out; the codebook loss
  drags the codes toward the balanced clusters and the commitment loss the encoder toward them. Inference
  stays nearest-code, so an item's codes never depend on which other items share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def squared_distances(x: Tensor, codes: Tensor) -> Tensor:
    """``[N, K]`` squared Euclidean distances between rows of ``x [N, D]`` and ``codes [K, D]``.

    Always in float32, also under mixed-precision autocast: in bfloat16 the expanded form loses the small
    differences between nearby codes that the assignment depends on.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, codes = x.float(), codes.float()
        return (x.pow(2).sum(1, keepdim=True) - 2 * x @ codes.T + codes.pow(2).sum(1)).clamp_min_(0)


def kmeans(x: Tensor, k: int, iters: int) -> Tensor:
    """``k`` centres of ``x [N, D]`` by k-means++ seeding and ``iters`` Lloyd steps.

    ``iters=0`` returns the k-means++ seeds (data points). Clusters that empty during Lloyd steps are
    moved to the points worst served by their centre. With fewer points than centres, points are reused
    with a little noise so that no two centres coincide (coinciding codes would split ties arbitrarily).
    """
    x = x.float()
    n = len(x)
    if n == 0:
        raise ValueError("k-means needs at least one point")
    if n <= k:
        extra = x[torch.randint(n, (k - n,), device=x.device)]
        noise = 1e-3 * (x.std() if n > 1 else x.abs().mean()).clamp_min(1e-6)
        return torch.cat([x, extra + noise * torch.randn_like(extra)])
    centres = torch.empty(k, x.shape[1], device=x.device, dtype=x.dtype)
    centres[0] = x[torch.randint(n, (1,), device=x.device)]
    nearest = squared_distances(x, centres[:1]).squeeze(1)
    for i in range(1, k):
        total = nearest.sum()
        pick = torch.multinomial(nearest / total, 1) if total > 0 else torch.randint(n, (1,), device=x.device)
        centres[i] = x[pick]
        nearest = torch.minimum(nearest, squared_distances(x, centres[i : i + 1]).squeeze(1))
    for _ in range(iters):
        dist = squared_distances(x, centres)
        best, assign = dist.min(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        alive = counts > 0
        centres[alive] = sums[alive] / counts[alive, None]
        empty = torch.nonzero(~alive).flatten()
        if len(empty):
            centres[empty] = x[best.topk(len(empty)).indices]
    return centres


def sinkhorn_codes(distances: Tensor, epsilon: float, iters: int) -> Tensor:
    """Balanced assignment of ``B`` points to ``K`` codes from ``distances [B, K]`` (log-domain Sinkhorn).

    Finds the transport plan ``exp(-d / epsilon + u_i + v_j)`` whose rows each carry one point and whose
    columns each receive ``B / K`` of them, and gives every point its plan's largest entry. Distances are
    rescaled to [-1, 1] (as LC-Rec does) so that ``epsilon`` means the same at every scale. Smaller
    ``epsilon`` approaches the exact balanced assignment (and needs more iterations); larger smooths the
    plan until its largest entries fall back to the nearest codes. Only the dual potentials are iterated,
    in log space, so a tiny ``epsilon`` cannot overflow. Returns ``[B]`` codes.
    """
    d = distances.detach().float()
    low, high = d.min(), d.max()
    logits = -(2 * d - high - low) / ((high - low).clamp_min(1e-12) * epsilon)
    batch, codes = d.shape
    # log(batch) from a tensor, not math.log: under torch.compile a Python float of the batch size would
    # specialise the graph to it, and the quantizer's batches vary in size (items without a modality)
    column_mass = torch.log(d.new_ones(()) * batch) - math.log(codes)
    v = logits.new_zeros(codes)
    for _ in range(iters):
        u = -torch.logsumexp(logits + v, 1, keepdim=True)
        v = column_mass - torch.logsumexp(logits + u, 0)
    return (logits + v).argmax(1)


@dataclass
class Quantized:
    """What one pass through a :class:`ResidualQuantizer` gives.

    ``quantized`` carries the straight-through gradient to the input; ``codebook_loss`` pulls codes toward
    the (detached) residuals they quantize, ``commitment_loss`` pulls the encoder toward its (detached)
    reconstruction; both are means over rows, dimensions and levels. ``last_distances [N, K]`` are the
    last level's squared distances (for collision re-assignment downstream).
    """

    quantized: Tensor
    codes: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor
    last_distances: Tensor


class ResidualQuantizer(nn.Module):
    """``num_levels`` codebooks of ``codebook_size`` codes in ``code_dim`` dimensions.

    The codebooks are one parameter ``codebook [L, K, D]`` so that re-seeding can reset the optimizer
    state of exactly the re-seeded rows. Usage counts and the residual pool are training scratch, not
    part of the state dict.
    """

    def __init__(
        self,
        num_levels: int,
        codebook_size: int,
        code_dim: int,
        sinkhorn_last_level: bool = False,
        sinkhorn_epsilon: float = 0.003,
        sinkhorn_iters: int = 30,
        reseed_pool_size: int = 2048,
    ) -> None:
        super().__init__()
        if num_levels < 1 or codebook_size < 2 or code_dim < 1:
            raise ValueError(
                f"need num_levels >= 1, codebook_size >= 2, code_dim >= 1; got {num_levels}, {codebook_size}, {code_dim}"
            )
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.sinkhorn_last_level = sinkhorn_last_level
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iters = sinkhorn_iters
        self.balance_codes: Callable[[Tensor, float, int], Tensor] = sinkhorn_codes
        """The balanced assignment; the MM-RQ-VAE swaps in a compiled ``sinkhorn_codes`` (``model.compile``)."""
        self.codebook = nn.Parameter(torch.zeros(num_levels, codebook_size, code_dim))
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("usage", torch.zeros(num_levels, codebook_size), persistent=False)
        self.register_buffer("pool", torch.zeros(num_levels, reseed_pool_size, code_dim), persistent=False)
        self._pool_next = 0
        self._pool_filled = 0

    @torch.no_grad()
    def initialise(self, z: Tensor, kmeans_iters: int) -> None:
        """Set each level's codes to k-means centres of the residuals the previous levels leave on ``z``."""
        residual = z.detach().float()
        for level in range(self.num_levels):
            centres = kmeans(residual, self.codebook_size, kmeans_iters)
            self.codebook[level] = centres
            residual = residual - centres[squared_distances(residual, centres).argmin(1)]
        self.initialised.fill_(True)

    def forward(self, z: Tensor, balance: bool = False) -> Quantized:
        """Quantize ``z [N, D]`` level by level; ``balance`` uses Sinkhorn on the last level (if enabled).

        In training mode the residuals and their *nearest* codes are recorded for dead-code re-seeding
        (nearest, not Sinkhorn-balanced: a code is alive only if inference, which is nearest-code, uses it).
        """
        residual = z
        total = torch.zeros_like(z)
        codes, codebook_losses, commitment_losses = [], [], []
        distances = z.new_zeros(len(z), self.codebook_size)
        for level in range(self.num_levels):
            book = self.codebook[level]
            distances = squared_distances(residual.detach(), book.detach())
            last = level == self.num_levels - 1
            nearest = distances.argmin(1)
            if balance and last and self.sinkhorn_last_level and len(z) > 1:
                index = self.balance_codes(distances, self.sinkhorn_epsilon, self.sinkhorn_iters)
            else:
                index = nearest
            chosen = book[index]
            codebook_losses.append(F.mse_loss(chosen, residual.detach()))
            commitment_losses.append(F.mse_loss(residual, chosen.detach()))
            if self.training:
                self._record(level, residual.detach(), nearest)
            total = total + chosen.detach()
            residual = residual - chosen.detach()
            codes.append(index)
        return Quantized(
            quantized=z + (total - z).detach(),
            codes=torch.stack(codes, 1),
            codebook_loss=torch.stack(codebook_losses).mean(),
            commitment_loss=torch.stack(commitment_losses).mean(),
            last_distances=distances,
        )

    def _record(self, level: int, residual: Tensor, index: Tensor) -> None:
        # index_add_, not bincount: bincount on a GPU reads the largest index back to size its output, a host
        # sync in every training step for every level
        self.usage[level].index_add_(0, index, torch.ones_like(index, dtype=self.usage.dtype))
        size = self.pool.shape[1]
        if size == 0:
            return
        if len(residual) > size:
            residual = residual[torch.randperm(len(residual), device=residual.device)[:size]]
        slots = (self._pool_next + torch.arange(len(residual), device=residual.device)) % size
        self.pool[level, slots] = residual.to(self.pool.dtype)
        if level == self.num_levels - 1:
            self._pool_next = (self._pool_next + len(residual)) % size
            self._pool_filled = min(size, self._pool_filled + len(residual))

    def reset_usage(self) -> None:
        """Start a new counting window (an epoch) for usage and the residual pool."""
        self.usage.zero_()
        self._pool_next = 0
        self._pool_filled = 0

    @torch.no_grad()
    def reseed_dead_codes(self, min_usage: int = 1) -> dict[int, Tensor]:
        """Move codes used fewer than ``min_usage`` times since :meth:`reset_usage` onto pooled residuals.

        Returns ``{level: re-seeded code indices}``; nothing happens when no training batch was recorded
        (for example right after resuming), because then every code would look dead.
        """
        if self._pool_filled == 0 or self.usage.sum() == 0:
            return {}
        reseeded = {}
        for level in range(self.num_levels):
            dead = torch.nonzero(self.usage[level] < min_usage).flatten()
            if len(dead) == 0:
                continue
            pool = self.pool[level, : self._pool_filled]
            if len(dead) <= len(pool):
                picks = pool[torch.randperm(len(pool), device=pool.device)[: len(dead)]]
            else:
                picks = pool[torch.randint(len(pool), (len(dead),), device=pool.device)]
                picks = picks + 1e-3 * pool.std().clamp_min(1e-6) * torch.randn_like(picks)
            self.codebook[level, dead] = picks.to(self.codebook.dtype)
            reseeded[level] = dead
        return reseeded

    @torch.no_grad()
    def nearest_codes(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Deterministic nearest-code assignment: ``(codes [N, L], quantized [N, D], last_distances [N, K])``."""
        residual = z.detach()
        total = torch.zeros_like(residual)
        codes = []
        distances = residual.new_zeros(len(residual), self.codebook_size)
        for level in range(self.num_levels):
            book = self.codebook[level].detach().to(residual.dtype)
            distances = squared_distances(residual, book)
            index = distances.argmin(1)
            total = total + book[index]
            residual = residual - book[index]
            codes.append(index)
        return torch.stack(codes, 1), total, distances
