"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over a user's item history.

It is both the collaborative baseline every LLM result is compared with and, through its item embedding
table, MME-SID's collaborative ("ID") modality.

Conventions, and why:

- **Item 0 is a real item.** ``history`` is left-padded with 0 and only ``mask`` tells padding apart, so
  the embedding has no ``padding_idx``; padded positions are zeroed and never attended to.
- **Positions count from the right**: the most recent item always has position ``max_len - 1``, as in
  SASRec's fixed-length left-padded inputs. A user's output then does not depend on how much padding the
  batch adds, so evaluation results do not depend on batch composition.
- **Attention** is causal and ignores padded keys. A padded query position may attend to itself, because a
  fully masked attention row would produce NaN that could leak into real positions through the softmax.
- **Scores** are the last position's hidden state times the (tied) item embedding table, plus an optional
  per-item bias, computed in float32 even under bf16 autocast: low-precision scores tie often and ties
  are ranked pessimistically.
- **Losses.** ``ce``: softmax cross-entropy over the whole catalog at every position (the strong setting
  of later reproductions); ``bce``: the original paper's binary cross-entropy against ``num_negatives``
  items sampled uniformly per position (a sampled negative may rarely equal the positive; with thousands of
  items this is negligible and keeps sampling cheap). The two give very different figures; say which.
- **Compiled training** (``compile``, for GPUs). A step of this small model is hundreds of tiny kernels,
  so launch overhead, not arithmetic, sets its speed; ``torch.compile`` fuses them. ``shifted`` batches
  are then padded to ``max_len`` (positions count from the right, so no output changes) and the ``ce``
  loss is taken over every position with padding ignored, not over the real positions picked by boolean
  indexing: one graph of static shape serves every batch, and no step waits on the host for a
  data-dependent shape. The loss is the same mean over the same positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.artifacts import Stage
from mmrec.errors import InputError
from mmrec.metrics.ranking import DEFAULT_K, RankingMetrics, target_ranks
from mmrec.models.compiled import Compiled

STAGE = str(Stage.FIT_COLLAB)
MONITOR = "val/ndcg@10"


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention restricted by a boolean ``allowed [B, 1, L, L]`` mask."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, hidden // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, hidden))


class Block(nn.Module):
    """Pre-norm transformer block: attention and a point-wise feed-forward net, each with a residual."""

    def __init__(self, hidden_size: int, num_heads: int, ffn_size: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden_size)
        self.attention = CausalSelfAttention(hidden_size, num_heads, dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(hidden_size)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_size, ffn_size), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_size, hidden_size), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.attention_dropout(self.attention(self.attention_norm(x), allowed))
        return x + self.ffn(self.ffn_norm(x))


class SASRec(L.LightningModule):
    """SASRec with full-catalog cross-entropy (default) or sampled binary cross-entropy.

    Args:
        num_items: catalog size (linked from the data module; not set by hand).
        hidden_size: embedding and hidden width; also the width of the exported collaborative embeddings.
        num_blocks: transformer blocks.
        num_heads: attention heads (must divide ``hidden_size``).
        max_len: positions the model reads; older history items are dropped (linked from ``data.max_len``).
        dropout: dropout on embeddings, attention output, attention weights and feed-forward layers.
        ffn_size: feed-forward inner width; ``None`` uses ``hidden_size`` as the original SASRec does.
        loss: ``ce`` (softmax over all items) or ``bce`` (sampled negatives).
        num_negatives: negatives per position for ``bce``.
        item_bias: add a learned per-item bias to the scores.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        eval_k: cutoffs of the validation metrics logged as ``val/recall@K`` and ``val/ndcg@K``.
        compile: ``torch.compile`` the training pass (see the module notes); worth it on a GPU, not on a
            CPU, where the first compilation costs more than it saves. Evaluation stays eager.
    """

    def __init__(
        self,
        num_items: int,
        hidden_size: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        max_len: int = 50,
        dropout: float = 0.2,
        ffn_size: int | None = None,
        loss: Literal["ce", "bce"] = "ce",
        num_negatives: int = 1,
        item_bias: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        eval_k: list[int] = list(DEFAULT_K),  # noqa: B006 (jsonargparse needs a literal default)
        compile: bool = False,
    ) -> None:
        super().__init__()
        if num_items < 1 or max_len < 1 or num_blocks < 0 or num_negatives < 1:
            raise InputError("SASRec needs num_items >= 1, max_len >= 1, num_blocks >= 0 and num_negatives >= 1")
        if hidden_size % num_heads:
            raise InputError(f"model.num_heads ({num_heads}) must divide model.hidden_size ({hidden_size})")
        if loss not in ("ce", "bce"):
            raise InputError(f"model.loss must be 'ce' or 'bce', got '{loss}'")
        self.save_hyperparameters()
        self.item_embedding = nn.Embedding(num_items, hidden_size)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, ffn_size or hidden_size, dropout) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(hidden_size)
        self.item_bias = nn.Parameter(torch.zeros(num_items)) if item_bias else None
        self.val_metrics = RankingMetrics(eval_k)
        self._compiled: dict[str, Compiled] = {}
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def encode(self, history: Tensor, mask: Tensor) -> Tensor:
        """Hidden states ``[B, L, H]`` of the last ``max_len`` history positions (zeros on padding)."""
        max_len = self.hparams.max_len
        history, mask = history[:, -max_len:], mask[:, -max_len:]
        length = history.shape[1]
        positions = torch.arange(max_len - length, max_len, device=history.device)
        x = self.item_embedding(history) * math.sqrt(self.hparams.hidden_size) + self.position_embedding(positions)
        keep = mask[..., None].to(x.dtype)
        x = self.input_dropout(x) * keep
        causal = torch.ones(length, length, dtype=torch.bool, device=history.device).tril()
        itself = torch.eye(length, dtype=torch.bool, device=history.device)
        allowed = (causal & (mask[:, None, :] | itself))[:, None]
        for block in self.blocks:
            x = block(x, allowed) * keep
        return self.final_norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """Scores of every item for each hidden state ``[..., H] -> [..., num_items]``."""
        return F.linear(hidden, self.item_embedding.weight, self.item_bias)

    def score_batch(self, batch: dict[str, Tensor]) -> Tensor:
        """Recommender protocol: ``[B, num_items]`` float32 scores from the most recent position."""
        hidden = self.encode(batch["history"], batch["mask"])[:, -1]
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if self.item_bias is None else self.item_bias.float()
            return F.linear(hidden.float(), self.item_embedding.weight.float(), bias)

    def loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """The configured loss for hidden states ``[M, H]`` and their next items ``[M]``."""
        if self.hparams.loss == "ce":
            return F.cross_entropy(self.logits(hidden).float(), targets)
        negatives = torch.randint(0, self.hparams.num_items, (len(targets), self.hparams.num_negatives), device=targets.device)
        positive = (hidden * self.item_embedding(targets)).sum(-1)
        negative = torch.einsum("mh,mnh->mn", hidden, self.item_embedding(negatives))
        if self.item_bias is not None:
            positive, negative = positive + self.item_bias[targets], negative + self.item_bias[negatives]
        positive, negative = positive.float(), negative.float()
        return (
            F.binary_cross_entropy_with_logits(positive, torch.ones_like(positive))
            + F.binary_cross_entropy_with_logits(negative, torch.zeros_like(negative), reduction="none").sum(-1).mean()
        )

    def training_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Loss of a ``shifted`` batch (next item at every real position) or a ``prefix`` batch (last position)."""
        history, mask = batch["history"], batch["mask"]
        if "targets" not in batch:
            return self.loss(self._network("encode", self.encode)(history, mask)[:, -1], batch["target"])
        targets = batch["targets"][:, -self.hparams.max_len:]
        if self.hparams.compile:
            length = self.hparams.max_len
            history, mask, targets = pad_left(history, length, 0), pad_left(mask, length, False), pad_left(targets, length, -100)
            if self.hparams.loss == "ce":
                return self._network("dense_ce", self.dense_ce_loss)(history, mask, targets)
        hidden = self._network("encode", self.encode)(history, mask)
        real = targets != -100
        return self.loss(hidden[real], targets[real])

    def dense_ce_loss(self, history: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
        """``ce`` over every position of a shifted batch, padding (target ``-100``) ignored: the mean over real
        positions without selecting them, so the shapes do not depend on the data."""
        logits = self.logits(self.encode(history, mask)).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    def _network(self, name: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """``fn``, compiled (once, on first use) when ``compile`` is set."""
        if not self.hparams.compile:
            return fn
        if name not in self._compiled:
            self._compiled[name] = Compiled(fn, f"SASRec.{name}")
        return self._compiled[name]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["history"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.val_metrics.update(target_ranks(self.score_batch(batch), batch["target"]))

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        for name, value in values.items():
            self.log(f"val/{name}", float(value), prog_bar=name in ("recall@10", "ndcg@10"))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, betas=(0.9, 0.98))

    def spec(self) -> dict:
        """The constructor arguments that rebuild this model (``sasrec.json``'s hyperparameters)."""
        return constructor_arguments(self.hparams)

    @classmethod
    def from_state(cls, hparams: dict, state: dict[str, Tensor]) -> SASRec:
        """A model of these hyperparameters (a spec, or a checkpoint's) holding the tensors of ``state``."""
        model = cls(**constructor_arguments(hparams))
        model.load_state_dict(state)
        return model

    def item_embeddings(self) -> np.ndarray:
        """The item embedding table ``[num_items, hidden_size]``: the exported collaborative modality."""
        return self.item_embedding.weight.detach().float().cpu().numpy()


def pad_left(tensor: Tensor, length: int, fill: float | bool) -> Tensor:
    """``tensor [B, l]`` left-padded with ``fill`` to ``[B, length]`` (``l <= length``)."""
    missing = length - tensor.shape[1]
    if missing <= 0:
        return tensor
    return torch.cat([tensor.new_full((tensor.shape[0], missing), fill), tensor], 1)


def constructor_arguments(hparams: dict) -> dict:
    """Hyperparameters without the keys LightningCLI adds for itself (``_instantiator``, ``_class_path``)."""
    return {name: value for name, value in hparams.items() if not name.startswith("_")}
