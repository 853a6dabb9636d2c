"""MM-RQ-VAE (MME-SID): one residual-quantized autoencoder per modality, trained together.

Each modality (``collab``, ``text``, ``image``; any non-empty subset) has its own branch: input
normalisation, MLP encoder, :class:`~mmrec.models.residual_quantizer.ResidualQuantizer`, mirrored MLP
decoder. The branches are coupled only by InfoNCE between the quantized vector of an anchor modality
(the collaborative one by default) and that of each content modality, so that an item's codes in
different modalities describe the same item. An item's codes in a modality become its semantic ID there;
the codebooks become the code embeddings the LLM recommender starts from.

Items without a modality (``<m>_present`` False) are dropped from that branch before anything is computed:
they are never encoded, never counted as code usage, never reconstructed and never aligned.

Under DDP (Lightning's ``ddp`` strategy) gradients are all-reduced but in-place edits of parameters are not,
so the two places that edit codebooks directly keep every rank's copy identical themselves: the k-means
initialisation runs on the rows of all ranks' first batches and rank 0's result is broadcast, and dead-code
re-seeding sums the usage counts over ranks, re-seeds on rank 0 and broadcasts the codebook. Each rank
counts usage for its own batches (the counts and the residual pool are kept out of DDP's buffer broadcast).
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.errors import InputError
from mmrec.metrics.codes import (
    code_perplexity,
    code_utilisation,
    kendall_tau_distances,
    reconstruction_cosine,
    unique_tuple_fraction,
)
from mmrec.models.compiled import Compiled
from mmrec.models.quantizer_losses import info_nce, mk_mmd
from mmrec.models.residual_quantizer import Quantized, ResidualQuantizer, sinkhorn_codes

DEAD_CODE_STATS = "dead_code_stats"
"""Checkpoint key of the quantizers' usage counts and residual pools (see ``MMRQVAE.on_save_checkpoint``)."""


ROWS, ALIGNED = "_rows", "_aligned_rows"
"""Suffixes of the batch keys that :meth:`MMRQVAE.on_before_batch_transfer` adds: ``<m>_rows`` and
``<m>_aligned_rows``."""


def present_rows(batch: dict[str, Tensor], m: str) -> Tensor:
    """Indices ``[n]`` of the rows of ``batch`` that have modality ``m`` (precomputed on the host if there)."""
    return batch[f"{m}{ROWS}"] if f"{m}{ROWS}" in batch else torch.nonzero(batch[f"{m}_present"].bool()).flatten()


def aligned_rows(batch: dict[str, Tensor], anchor: str, m: str) -> Tensor:
    """``[2, n]``: for the items that have both ``anchor`` and ``m``, their row among the anchor's present
    rows and among ``m``'s (the rows of the two branch passes that InfoNCE pairs); precomputed if there."""
    if f"{m}{ALIGNED}" in batch:
        return batch[f"{m}{ALIGNED}"]
    present_a, present_m = batch[f"{anchor}_present"].bool(), batch[f"{m}_present"].bool()
    both = present_a & present_m
    return torch.stack([(present_a.cumsum(0) - 1)[both], (present_m.cumsum(0) - 1)[both]])


class InputNorm(nn.Module):
    """Puts every modality on a comparable scale before encoding; the decoder reconstructs this space.

    ``standardize`` subtracts the table mean and divides by one scalar (the root-mean-square deviation
    per dimension): one scale for all dimensions, so distances between items keep their order.
    ``l2`` subtracts the table mean and projects onto the sphere of radius sqrt(dim): cosine geometry,
    at the same per-dimension scale as ``standardize``. It suits embeddings whose norm mostly encodes
    popularity (collaborative ones): standardised, a few popular items far from the origin take most
    codes and the crowded rest collide. ``none`` leaves inputs as they are. The statistics are fitted
    once on the training table and saved with the model.
    """

    def __init__(self, dim: int, mode: Literal["none", "l2", "standardize"]) -> None:
        super().__init__()
        self.mode = mode
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        if self.mode != "none":
            self.mean.copy_(x.mean(0))
            self.scale.copy_((x - self.mean).pow(2).mean().sqrt().clamp_min(1e-8))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "l2":
            return F.normalize(x - self.mean, dim=1) * math.sqrt(x.shape[1])
        if self.mode == "standardize":
            return (x - self.mean) / self.scale
        return x


def mlp(dims: list[int], dropout: float) -> nn.Sequential:
    """Linear layers through ``dims`` with ReLU (and dropout) between them, none after the last.

    Weights use He (Kaiming) initialisation so that activations keep their scale through the stack.
    With PyTorch's default initialisation a 4-layer encoder's latents start some 30 times smaller than
    its inputs; Adam's first steps are then large relative to the latents, which move away from their
    k-means codes within a few steps and collapse onto a handful of them.
    """
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        linear = nn.Linear(fan_in, fan_out)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Branch(nn.Module):
    """One modality's normaliser, encoder, residual quantizer and mirrored decoder."""

    def __init__(
        self, input_dim: int, hidden_dims: list[int], code_dim: int, dropout: float, norm: str, quantizer: ResidualQuantizer,
    ) -> None:
        super().__init__()
        dims = [input_dim, *hidden_dims, code_dim]
        self.norm = InputNorm(input_dim, norm)
        self.encoder = mlp(dims, dropout)
        self.quantizer = quantizer
        self.decoder = mlp(dims[::-1], dropout)


@dataclass
class BranchPass:
    """One modality's training pass over the present rows of a batch."""

    target: Tensor
    quantized: Quantized
    reconstruction: Tensor


class CodeTable:
    """Collects one modality's codes, inputs and reconstructions over a whole table, then scores them."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Tensor]] = {"codes": [], "original": [], "quantized": [], "target": [], "recon": []}

    def add(self, **rows: Tensor) -> None:
        for key, value in rows.items():
            self.parts[key].append(value.detach().cpu())

    def report(self, codebook_size: int, tau_pairs: int, seed: int = 0) -> dict[str, Any]:
        data = {key: torch.cat(value) for key, value in self.parts.items()}
        codes = data["codes"]
        enough = len(codes) >= 2
        return {
            "items": len(codes),
            "utilisation": code_utilisation(codes, codebook_size),
            "perplexity": code_perplexity(codes, codebook_size),
            "unique_tuple_fraction": unique_tuple_fraction(codes),
            "recon_cosine": reconstruction_cosine(data["target"], data["recon"]) if len(codes) else float("nan"),
            "kendall_tau": (
                kendall_tau_distances(data["original"], data["quantized"], tau_pairs, seed) if enough else float("nan")
            ),
        }


class MMRQVAE(L.LightningModule):
    """Multimodal residual-quantized VAE whose codes are the items' semantic IDs.

    Args:
        input_dims: embedding width per modality; linked from the data module's ``input_dims``, its keys
            are the modalities.
        num_levels: codes per semantic ID (L).
        codebook_size: codes per level (K).
        code_dim: width of latents and codes; set it to the LLM's hidden size to let the codebooks
            initialise the LLM-side code embeddings directly.
        hidden_dims: encoder hidden widths (the decoder mirrors them).
        dropout: dropout between hidden layers.
        input_norm: per-modality input normalisation (see :class:`InputNorm`).
        recon_loss: ``mmd`` (MME-SID: multi-kernel Gaussian MMD) or ``mse`` (the ablation).
        recon_weight: weight of the reconstruction term (MME-SID: 3); 0 switches it off.
        mmd_bandwidths: multiples of the median pairwise squared distance used as Gaussian bandwidths.
        codebook_weight: weight of the codebook term (codes toward residuals); 0 freezes the codes.
        commitment_weight: weight of the commitment term (encoder toward codes; beta = 0.25).
        align_weight: weight of InfoNCE between the anchor's and each content modality's quantized
            vector (MME-SID: 0.01); 0 switches alignment off.
        align_temperature: InfoNCE temperature.
        align_anchor: the modality every other one is aligned with; alignment is skipped when it is not
            among the modalities.
        kmeans_iters: Lloyd iterations of the k-means codebook initialisation (0: k-means++ seeds only).
        init_max_items: at most this many items (per modality) feed the normalisation statistics and
            k-means initialisation, which run once on the training table before the first step.
        reseed_dead_codes: at the start of every epoch, move codes that were no training item's nearest code
            during the previous epoch onto random residuals of that epoch.
        reseed_min_usage: a code used fewer times than this in an epoch counts as dead.
        reseed_pool_size: residuals kept per level (ring buffer) to re-seed from.
        sinkhorn_last_level: balanced (Sinkhorn) assignment on the last level during training.
        sinkhorn_epsilon: Sinkhorn entropy (distances scaled to [-1, 1]); smaller is closer to an exact
            balanced assignment, larger drifts back toward nearest-code.
        sinkhorn_iters: Sinkhorn iterations.
        lr: AdamW learning rate (MME-SID: 2e-4).
        weight_decay: AdamW weight decay for encoders and decoders (codebooks are not decayed).
        tau_pairs: item pairs sampled for the Kendall's tau logged each validation epoch.
        compile: ``torch.compile`` the Sinkhorn balancing (for GPUs). Its iterations are a few
            hundred tiny kernels per step, most of a step's time on a GPU; compiled, they fuse into a few.
            The same computation (up to float rounding), with the batch size as a dynamic dimension.
    """

    def __init__(
        self,
        input_dims: dict[str, int] = {"collab": 64, "text": 384},  # noqa: B006 (jsonargparse needs a literal default)
        num_levels: int = 4,
        codebook_size: int = 256,
        code_dim: int = 64,
        hidden_dims: list[int] = [512, 256, 128],  # noqa: B006
        dropout: float = 0.0,
        input_norm: Literal["none", "l2", "standardize"] = "standardize",
        recon_loss: Literal["mmd", "mse"] = "mmd",
        recon_weight: float = 3.0,
        mmd_bandwidths: list[float] = [0.25, 0.5, 1.0, 2.0, 4.0],  # noqa: B006
        codebook_weight: float = 1.0,
        commitment_weight: float = 0.25,
        align_weight: float = 0.01,
        align_temperature: float = 0.1,
        align_anchor: str = "collab",
        kmeans_iters: int = 20,
        init_max_items: int = 65536,
        reseed_dead_codes: bool = True,
        reseed_min_usage: int = 1,
        reseed_pool_size: int = 2048,
        sinkhorn_last_level: bool = True,
        sinkhorn_epsilon: float = 0.003,
        sinkhorn_iters: int = 30,
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        tau_pairs: int = 20000,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not input_dims:
            raise InputError("model.input_dims is empty: the quantizer needs at least one modality")
        self.save_hyperparameters()
        self.modalities = list(input_dims)
        self.branches = nn.ModuleDict(
            {
                m: Branch(
                    dim, list(hidden_dims), code_dim, dropout, input_norm,
                    ResidualQuantizer(
                        num_levels, codebook_size, code_dim,
                        sinkhorn_last_level, sinkhorn_epsilon, sinkhorn_iters, reseed_pool_size,
                    ),
                )
                for m, dim in input_dims.items()
            }
        )
        self._tables: dict[str, CodeTable] = {}
        if compile:
            balance = Compiled(sinkhorn_codes, "sinkhorn_codes", dynamic=True)
            for branch in self.branches.values():
                branch.quantizer.balance_codes = balance
        # DDP would overwrite every rank's usage counts and residual pool with rank 0's at each forward
        # (broadcast_buffers); they are per-rank tallies, combined only when re-seeding
        self._ddp_params_and_buffers_to_ignore = [
            f"branches.{m}.quantizer.{name}" for m in self.modalities for name in ("usage", "pool")
        ]

    # ----------------------------------------------------------------------------------------- inference
    @contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode and no gradients for the duration (restoring the previous mode), so codes are deterministic."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def _present_modalities(self, batch: dict[str, Tensor]) -> list[str]:
        return [m for m in self.modalities if m in batch]

    def encode(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per modality in ``batch``: the latent ``[B, code_dim]`` before quantization (every row)."""
        with self._inference():
            return {
                m: self.branches[m].encoder(self.branches[m].norm(batch[m].float().to(self.device)))
                for m in self._present_modalities(batch)
            }

    def quantize(self, batch: dict[str, Tensor], return_distances: bool = False) -> dict[str, Tensor]:
        """Semantic IDs: per modality ``m`` in ``batch``, ``out[m]`` = codes ``LongTensor [B, L]``.

        Assignment is the deterministic nearest code at every level (also when Sinkhorn balancing was used
        in training: balancing is a training device, and an item's codes must not depend on its batch).
        ``out[f"{m}_present"]`` repeats the batch's mask: codes are computed for every row but mean
        something only where it is True. With ``return_distances``, ``out[f"{m}_last_distances"] [B, K]``
        are the squared distances of the last-level residual to every last-level code.
        """
        out: dict[str, Tensor] = {}
        latents = self.encode(batch)
        with self._inference():
            for m, z in latents.items():
                codes, _, distances = self.branches[m].quantizer.nearest_codes(z)
                out[m] = codes
                out[f"{m}_present"] = batch[f"{m}_present"].bool().to(codes.device)
                if return_distances:
                    out[f"{m}_last_distances"] = distances
        return out

    def quantized(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per modality in ``batch``: the sum of the item's chosen codes ``[B, code_dim]``."""
        latents = self.encode(batch)
        with self._inference():
            return {m: self.branches[m].quantizer.nearest_codes(z)[1] for m, z in latents.items()}

    def codebooks(self) -> dict[str, list[Tensor]]:
        """Per modality, the ``L`` codebooks as detached float32 CPU tensors ``[K, code_dim]``."""
        return {m: [book.detach().float().cpu().clone() for book in b.quantizer.codebook] for m, b in self.branches.items()}

    # ------------------------------------------------------------------------------------------ training
    def on_before_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        """Index each modality's present rows, and the rows the alignment pairs, while the batch is on the host.

        Selecting rows by a boolean mask on a GPU waits for the GPU to say how many rows there are; a
        training step did that several times, each stalling the queue of kernels. Index tensors computed
        here arrive with their lengths known (see :func:`present_rows`, :func:`aligned_rows`).
        """
        for m in self._present_modalities(batch):
            batch[f"{m}{ROWS}"] = present_rows(batch, m)
        anchor = self.hparams.align_anchor
        if anchor in batch:
            for m in self._present_modalities(batch):
                if m != anchor:
                    batch[f"{m}{ALIGNED}"] = aligned_rows(batch, anchor, m)
        return batch

    def _branch_pass(self, m: str, batch: dict[str, Tensor], balance: bool) -> BranchPass | None:
        rows = present_rows(batch, m)
        if len(rows) == 0:
            return None
        branch = self.branches[m]
        target = branch.norm(batch[m].index_select(0, rows).float())
        quantized = branch.quantizer(branch.encoder(target), balance=balance)
        return BranchPass(target, quantized, branch.decoder(quantized.quantized))

    def _reconstruction(self, p: BranchPass) -> Tensor | None:
        if self.hparams.recon_loss == "mse":
            return F.mse_loss(p.reconstruction, p.target)
        if len(p.target) < 2:
            return None
        return mk_mmd(p.reconstruction, p.target, self.hparams.mmd_bandwidths)

    def compute_losses(self, batch: dict[str, Tensor], balance: bool = True) -> dict[str, Tensor]:
        """Every loss term of one batch (``"<m>/recon"``, ``"<m>/codebook"``, ``"<m>/commitment"``,
        ``"align/<m>"``) and their weighted sum ``"loss"``; a term whose weight is 0 is reported but not
        optimised. ``balance`` enables Sinkhorn on the last level (when configured)."""
        hp = self.hparams
        passes = {m: self._branch_pass(m, batch, balance) for m in self.modalities}
        terms: dict[str, Tensor] = {}
        weighted: list[Tensor] = []

        def add(name: str, value: Tensor | None, weight: float) -> None:
            if value is None:
                return
            terms[name] = value
            if weight:
                weighted.append(weight * value)

        for m, p in passes.items():
            if p is None:
                continue
            add(f"{m}/recon", self._reconstruction(p), hp.recon_weight)
            add(f"{m}/codebook", p.quantized.codebook_loss, hp.codebook_weight)
            add(f"{m}/commitment", p.quantized.commitment_loss, hp.commitment_weight)
        anchor = passes.get(hp.align_anchor)
        if anchor is not None:
            for m, p in passes.items():
                if m == hp.align_anchor or p is None:
                    continue
                rows_a, rows_m = aligned_rows(batch, hp.align_anchor, m)
                if len(rows_a) < 2:
                    continue
                nce = info_nce(anchor.quantized.quantized[rows_a], p.quantized.quantized[rows_m], hp.align_temperature)
                add(f"align/{m}", nce, hp.align_weight)
        terms["loss"] = torch.stack(weighted).sum() if weighted else torch.zeros((), device=self.device)
        return terms

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        terms = self.compute_losses(batch, balance=True)
        size = len(batch["item_idx"])
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), on_step=False, on_epoch=True, prog_bar=name == "loss", batch_size=size)
        return terms["loss"] if terms["loss"].requires_grad else None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        codebooks = [b.quantizer.codebook for b in self.branches.values()]
        ids = {id(p) for p in codebooks}
        others = [p for p in self.parameters() if id(p) not in ids]
        return torch.optim.AdamW(
            [{"params": others, "weight_decay": self.hparams.weight_decay}, {"params": codebooks, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )

    @torch.no_grad()
    def initialise(self, batches: Iterable[dict[str, Tensor]]) -> None:
        """Fit the input normalisers and k-means-initialise every codebook on (up to ``init_max_items`` of)
        the present rows of ``batches``; run once before training (``on_train_start`` does it)."""
        limit = self.hparams.init_max_items
        rows: dict[str, list[Tensor]] = {m: [] for m in self.modalities}
        seen = dict.fromkeys(self.modalities, 0)
        for batch in batches:
            for m in self.modalities:
                x = batch[m][batch[f"{m}_present"].bool()]
                rows[m].append(x)
                seen[m] += len(x)
            if min(seen.values()) >= limit:
                break
        with self._inference():
            for m, branch in self.branches.items():
                if seen[m] == 0:
                    raise InputError(f"modality '{m}': no item has it (every '{m}_present' is False)")
                x = torch.cat(rows[m])[:limit].float().to(self.device)
                branch.norm.fit(x)
                branch.quantizer.initialise(branch.encoder(branch.norm(x)), self.hparams.kmeans_iters)

    @property
    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def _gather_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The same batch position of every rank, concatenated (ranks' batches have equal shapes, see
        :class:`mmrec.data.resumable.EpochSampler`)."""
        gathered = self.all_gather({k: v.to(self.device) for k, v in batch.items()})
        return {k: v.flatten(0, 1) for k, v in gathered.items()}

    def _broadcast_from_rank_zero(self, *tensors: Tensor) -> None:
        for tensor in tensors:
            tensor.data.copy_(self.trainer.strategy.broadcast(tensor.data, src=0))

    def on_train_start(self) -> None:
        if not all(bool(b.quantizer.initialised) for b in self.branches.values()):
            if not self._distributed:
                self.initialise(self.trainer.train_dataloader)
                return
            # fitted on all ranks' rows; rank 0's result is broadcast, since k-means draws random numbers
            self.initialise(map(self._gather_batch, self.trainer.train_dataloader))
            for branch in self.branches.values():
                self._broadcast_from_rank_zero(branch.norm.mean, branch.norm.scale, branch.quantizer.codebook)

    def _reseed(self, quantizer: ResidualQuantizer) -> dict[int, Tensor]:
        """Re-seed dead codes; under DDP on the usage summed over ranks, by rank 0, broadcast to all."""
        if not self._distributed:
            return quantizer.reseed_dead_codes(self.hparams.reseed_min_usage)
        self.trainer.strategy.reduce(quantizer.usage, reduce_op="sum")  # in place
        reseeded = quantizer.reseed_dead_codes(self.hparams.reseed_min_usage) if self.trainer.is_global_zero else {}
        reseeded = self.trainer.strategy.broadcast({k: v.cpu() for k, v in reseeded.items()}, src=0)
        self._broadcast_from_rank_zero(quantizer.codebook)
        return reseeded

    def on_train_epoch_start(self) -> None:
        if self.hparams.reseed_dead_codes:
            for m, branch in self.branches.items():
                reseeded = self._reseed(branch.quantizer)
                self._reset_optimizer_rows(branch.quantizer.codebook, reseeded)
                if self.current_epoch > 0:
                    count = float(sum(len(v) for v in reseeded.values()))
                    self.log(f"train/{m}/reseeded", count, on_step=False, on_epoch=True)
        for branch in self.branches.values():
            branch.quantizer.reset_usage()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the epoch's dead-code statistics (usage counts and residual pool) in the checkpoint.

        They are training scratch, outside the state dict, but the next epoch's re-seeding reads them: a run
        resumed mid-epoch without them would count only the batches after the resume (codes used only
        before it would look dead) and re-seed other codes than an uninterrupted run. Under DDP (this hook
        runs on every rank) the usage saved is the sum over ranks, which is all re-seeding reads, and the
        pool rank 0's, the only one it draws from; :meth:`on_load_checkpoint` gives the sum to rank 0.
        """
        stats: dict[str, dict[str, Any]] = {}
        for m, branch in self.branches.items():
            q = branch.quantizer
            usage = q.usage.detach().clone()
            if self._distributed:
                self.trainer.strategy.reduce(usage, reduce_op="sum")
            stats[m] = {"usage": usage.cpu(), "pool": q.pool.detach().cpu().clone(),
                        "pool_next": q._pool_next, "pool_filled": q._pool_filled}
        checkpoint[DEAD_CODE_STATS] = stats

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` kept (absent in checkpoints of older mmrec versions)."""
        for m, stats in checkpoint.get(DEAD_CODE_STATS, {}).items():
            if m in self.branches:
                quantizer = self.branches[m].quantizer
                quantizer.usage.copy_(stats["usage"])
                if self._distributed and not self.trainer.is_global_zero:
                    quantizer.usage.zero_()  # rank 0 holds the sum over ranks (see on_save_checkpoint)
                quantizer.pool.copy_(stats["pool"])
                quantizer._pool_next, quantizer._pool_filled = int(stats["pool_next"]), int(stats["pool_filled"])

    def _reset_optimizer_rows(self, codebook: nn.Parameter, rows: dict[int, Tensor]) -> None:
        """Clear Adam's moments of re-seeded codes, so stale momentum does not drag them off their seed."""
        if not rows or self._trainer is None:
            return
        optimizer = self.optimizers()
        state = getattr(optimizer, "optimizer", optimizer).state.get(codebook, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                for level, index in rows.items():
                    state[key][level, index] = 0

    # ---------------------------------------------------------------------------------------- evaluation
    def _table_rows(self, batch: dict[str, Tensor]) -> Iterator[tuple[str, dict[str, Tensor]]]:
        with self._inference():
            for m in self._present_modalities(batch):
                present = batch[f"{m}_present"].bool()
                if not present.any():
                    continue
                branch = self.branches[m]
                original = batch[m][present].float().to(self.device)
                target = branch.norm(original)
                codes, quantized, _ = branch.quantizer.nearest_codes(branch.encoder(target))
                recon = branch.decoder(quantized)
                yield m, {"codes": codes, "original": original, "quantized": quantized, "target": target, "recon": recon}

    def evaluate_codes(self, batches: Iterable[dict[str, Tensor]], tau_pairs: int = 100_000) -> dict[str, dict[str, Any]]:
        """Score the codes of a whole table (every batch of ``batches``), per modality: ``items``,
        ``utilisation`` and ``perplexity`` per level, ``unique_tuple_fraction``, ``recon_cosine`` (in the
        normalised input space) and ``kendall_tau`` (input vs sum of codes, ``tau_pairs`` sampled pairs)."""
        tables: dict[str, CodeTable] = {}
        for batch in batches:
            for m, rows in self._table_rows(batch):
                tables.setdefault(m, CodeTable()).add(**rows)
        return {m: table.report(self.hparams.codebook_size, tau_pairs) for m, table in tables.items()}

    def on_validation_epoch_start(self) -> None:
        self._tables = {}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        for m, rows in self._table_rows(batch):
            self._tables.setdefault(m, CodeTable()).add(**rows)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        for m, table in self._tables.items():
            report = table.report(self.hparams.codebook_size, self.hparams.tau_pairs)
            metrics = {f"{m}/util_l{i}": u for i, u in enumerate(report["utilisation"])}
            metrics |= {f"{m}/ppl_l{i}": p for i, p in enumerate(report["perplexity"])}
            metrics |= {f"{m}/recon_cos": report["recon_cosine"], f"{m}/tau": report["kendall_tau"]}
            self.log_dict(metrics)
            self.log(f"{m}/util_min", min(report["utilisation"]), prog_bar=True)
            self.log(f"{m}/unique", report["unique_tuple_fraction"], prog_bar=True)
        self._tables = {}

    # ------------------------------------------------------------------------- spec and rebuild
    def spec(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this model (``quantizer.json``'s hyperparameters)."""
        accepted = inspect.signature(type(self).__init__).parameters
        return {k: v for k, v in self.hparams.items() if k in accepted}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], state: dict[str, Tensor]) -> MMRQVAE:
        """A trained quantizer, in eval mode, from its spec and state dict (as ``fit-quantizer`` saved them)."""
        model = cls(**hparams)
        model.load_state_dict(state)
        return model.eval()
