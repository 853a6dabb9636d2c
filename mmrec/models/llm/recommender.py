"""The LLM recommender (MME-SID): a LoRA-tuned causal LM that reads a history of multimodal item vectors
and scores the whole catalog through frequency-aware fusion.

Training samples are every prefix of each user's training sequence; the loss is cross-entropy over all
items. Where the user state is read (``readout``) decides how those samples are computed. MME-SID's
``answer`` reads it after the question, at the token where the assistant's answer would begin, so each
prefix is its own prompt (``SequenceDataModule`` with ``train_mode=prefix``). ``item`` reads it at each
history item's own position, as SASRec does, so one causal pass over a user's whole sequence yields the
states of all its prefixes (``train_mode=shifted``): the same samples and loss for about a seventh of the
tokens on Beauty, and the same user state at evaluation as a prompt of that prefix alone. Only LoRA and mmrec's own modules
(item encoder with its code embeddings, fusion head) are trained, so Lightning checkpoints keep only those
tensors: the frozen backbone is rebuilt from its source when a checkpoint is loaded (see
:meth:`LLMRecommender.on_save_checkpoint`). The export for ``mmrec test`` is the peft adapter, the heads as
safetensors and ``recommender.json`` (see :func:`load`). With ``distill_weight`` the loss also distils the
trained SASRec's ranking of the catalog (:mod:`~mmrec.models.llm.distill`); the teacher only trains, so
neither checkpoints nor the export hold it and evaluation never reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.data.recommender_inputs import InputNeeds, RecommenderInputs
from mmrec.errors import InputError
from mmrec.metrics.ranking import DEFAULT_K, target_ranks
from mmrec.models.llm.backbone import Backbone
from mmrec.models.llm.base import (
    DEFAULT_BACKBONE,
    DEFAULT_LORA,
    MONITOR,
    STAGE,
    LLMRecommenderBase,
    TrainingError,
)
from mmrec.models.llm.distill import FrozenTeacher, check_distillation, distillation_loss
from mmrec.models.llm.fusion import HEAD, FrequencyAwareFusion
from mmrec.models.llm.item_encoder import ItemEncoder
from mmrec.models.llm.lora import LoRASpec
from mmrec.models.llm.prompt import PromptSpec, PromptSplicer
from mmrec.models.sid_embedding import SIDEmbedding

__all__ = ["MONITOR", "STAGE", "LLMRecommender"]
DEFAULT_PROMPT = PromptSpec()


class LLMRecommender(LLMRecommenderBase):
    """MME-SID's LLM recommender with the frequency-aware fusion head.

    Args:
        inputs: the catalog's tensors: the embeddings of ``modalities`` and of the scoring modalities, the SIDs
            of ``sid_modalities``, the training item counts and, with ``distill_weight``, the trained SASRec (built
            by the data module from the run folder and linked in by ``fit-recommender``; see :meth:`input_needs`).
        max_len: most recent history items read (linked from ``data.max_len``; evaluation truncates to it).
        backbone: the causal LM and its tokenizer, loaded (:func:`~mmrec.models.llm.backbone.load_backbone`;
            see :class:`~mmrec.models.llm.backbone.BackboneSpec` for what it loads). Its spec is recorded in the
            hyperparameters. ``fit-recommender`` loads ``model.backbone`` itself; the default is the ``tiny``
            spec unloaded, which the stage loads and a direct call refuses.
        lora: LoRA settings (see :class:`~mmrec.models.llm.lora.LoRASpec`).
        prompt: instruction texts around the history (see :class:`~mmrec.models.llm.prompt.PromptSpec`).
        readout: where the user state is read: ``answer`` (MME-SID) at the prompt's last token, after the
            question; ``item`` at the last history item (the question is then left out, since nothing would
            read it), which lets ``data.train_mode=shifted`` train on every prefix in one pass.
        modalities: raw embeddings that go into each item vector: any of ``collab``, ``text``, ``image``.
        sid_modalities: modalities whose semantic-ID code embeddings go into each item vector; None: the
            same as ``modalities``; ``[]``: no code embeddings.
        sid_scheme: how an SID becomes one vector: ``sum`` of per-level code embeddings, or Meta's
            ``prefix_ngram`` (also ``all_bigrams``, ``full_tuple``).
        code_init: ``codebook`` initialises code embeddings from the quantizer's codebooks (MME-SID);
            ``random`` is the ablation that forgets the quantizer's geometry.
        sid_table_size: hash-table size for schemes whose id space is too large (None: exact).
        scorers: what the fusion mixes: ``head`` (linear layer over all items) and/or modalities whose
            projected embeddings are dotted with the user state; None: ``head`` plus ``modalities``.
        proj_dim: width of each raw embedding's projection in the item encoder.
        encoder_hidden: hidden width of the item encoder's MLP.
        dropout: dropout in the item encoder.
        fusion_hidden: hidden width of the fusion weight MLP.
        lr: learning rate of the item encoder and fusion head.
        lora_lr: learning rate of the LoRA adapter.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the training steps with a linear learning-rate warm-up (cosine decay after).
        ks: cutoffs of the validation metrics.
        distill_weight: share ``w`` of the loss distilled from the trained SASRec of ``fit-collab`` (``inputs.teacher``):
            ``(1 - w) * CE + w * T^2 * KL(teacher || student)`` over the whole catalog, for every training prefix.
            The teacher's dense soft targets regularise a head that overfits on the next item alone and give
            every prefix SASRec's full ranking. Training only: test-time scores come from the LLM alone. In
            ``[0, 1)``; 0 (the default) trains on cross-entropy alone and loads no teacher.
        distill_temperature: ``T``, which softens both distributions (above 1 the teacher's lower ranks
            weigh more); a positive number.
        train_catalog: the items the training softmax (and the distillation) runs over. ``seen``: those with
            training interactions, as if the catalog held only them while training ran; an item never seen
            in training (a new item under ``prepare``'s ``split.new_items``, or one that only ever appears as
            a validation or test target) is then not pushed down as a negative of every sample, and is
            scored at test time by its content alone (see :class:`~mmrec.models.llm.fusion.FrequencyAwareFusion`).
            ``all``: every item is a negative. ``seen`` needs ``cold_start_dropout``: otherwise nothing sets the
            scale of content-only scores, and never-seen items crowd every user's list (bench/RESULTS.md).
        cold_start_dropout: share of the items, drawn afresh each training step, that are scored as a never-seen
            item is (without the head and the collab scorer, by their content alone; DropoutNet's idea), so
            that content-only scores are learnt on the scale of the others. 0: off.
    """

    head = "fusion"
    export_folder = STAGE
    trained_prefixes = ("item_encoder.", "fusion.")

    def __init__(
        self,
        inputs: RecommenderInputs,
        max_len: int = 20,
        backbone: Backbone = DEFAULT_BACKBONE,
        lora: LoRASpec = DEFAULT_LORA,
        prompt: PromptSpec = DEFAULT_PROMPT,
        readout: Literal["answer", "item"] = "answer",
        modalities: list[str] = ["collab", "text"],  # noqa: B006 (jsonargparse needs a literal default)
        sid_modalities: list[str] | None = None,
        sid_scheme: Literal["sum", "prefix_ngram", "all_bigrams", "full_tuple"] = "sum",
        code_init: Literal["codebook", "random"] = "codebook",
        sid_table_size: int | None = None,
        scorers: list[str] | None = None,
        proj_dim: int = 128,
        encoder_hidden: int = 512,
        dropout: float = 0.1,
        fusion_hidden: int = 16,
        lr: float = 1e-3,
        lora_lr: float = 2e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.05,
        ks: list[int] = list(DEFAULT_K),  # noqa: B006
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
        train_catalog: Literal["seen", "all"] = "all",
        cold_start_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["inputs", "backbone"])
        self._prepare(inputs, backbone, ks)
        needs = self.input_needs(self.hparams)
        scorers = [HEAD, *modalities] if scorers is None else list(scorers)
        score_modalities = [name for name in scorers if name != HEAD]
        self.max_len = max_len
        missing = sorted(set(needs.modalities) - set(inputs.embeddings))
        if missing:
            raise InputError(f"the inputs hold no embeddings for modalities {missing} (they have {sorted(inputs.embeddings)})")
        embeddings = inputs.embeddings
        sids = {name: self._sid_embedding(inputs, name) for name in needs.sid_modalities}

        model, tokenizer = backbone.require_loaded()
        self._attach_backbone(model, tokenizer, lora, prompt)
        if readout == "item":
            self.prompt_ids = (self.prompt_ids[0], [])
        self.prompt = PromptSplicer(*self.prompt_ids)
        hidden = model.config.hidden_size
        self.item_encoder = ItemEncoder(
            {name: embeddings[name].matrix for name in modalities}, sids,
            proj_dim=proj_dim, hidden_dim=encoder_hidden, out_dim=hidden, dropout=dropout,
        )
        self.fusion = FrequencyAwareFusion(
            hidden, inputs.train_item_counts,
            {name: embeddings[name].matrix for name in score_modalities},
            {name: embeddings[name].present for name in score_modalities},
            use_head=HEAD in scorers, mlp_hidden=fusion_hidden,
        )
        self.teacher = self._teacher(inputs)

    def _teacher(self, inputs: RecommenderInputs) -> FrozenTeacher | None:
        """The SASRec to distil from, frozen; None without distillation, and where the inputs hold no teacher
        (a model rebuilt for evaluation, which never reads it; a training step would refuse)."""
        if not self.hparams.distill_weight or inputs.teacher is None:
            return None
        teacher = FrozenTeacher(inputs.teacher)
        if teacher.num_items != inputs.num_items:
            raise InputError(f"the teacher SASRec scores {teacher.num_items} items, but the catalog has {inputs.num_items}")
        return teacher

    @classmethod
    def input_needs(cls, hparams: Mapping[str, Any]) -> InputNeeds:
        """The raw embeddings of ``modalities`` and of the scoring modalities, the SIDs of ``sid_modalities``,
        and the teacher when distilling (the distillation options are checked first, before any is loaded)."""
        distill_weight = float(hparams.get("distill_weight", 0.0))
        check_distillation(distill_weight, float(hparams.get("distill_temperature", 1.0)))
        share = float(hparams.get("cold_start_dropout", 0.0))
        if not 0.0 <= share < 1.0:
            raise InputError(f"model.cold_start_dropout must be in [0, 1) (the share of items scored by content alone), got {share}")
        modalities = list(hparams.get("modalities", ["collab", "text"]))
        scorers = hparams.get("scorers")
        scoring = [name for name in scorers if name != HEAD] if scorers is not None else []
        sid_modalities = hparams.get("sid_modalities")
        return InputNeeds(
            modalities=tuple(dict.fromkeys(modalities + scoring)),
            sid_modalities=tuple(modalities if sid_modalities is None else sid_modalities),
            teacher=distill_weight > 0,
        )

    def _sid_embedding(self, inputs: RecommenderInputs, name: str) -> tuple[nn.Module, int]:
        """Code embeddings of one modality, initialised from its codebooks or at random."""
        sid = self._sids(inputs, name)
        codes, codebooks = sid.codes, sid.codebooks
        dim = int(codebooks[0].shape[1])  # the same width for both inits, so the ablation changes only the start
        module = SIDEmbedding(
            codes, dim=dim, scheme=self.hparams.sid_scheme, codebooks=codebooks, init=self.hparams.code_init,
            table_size=self.hparams.sid_table_size,
        )
        return module, dim

    # ---- the network -------------------------------------------------------------------------------

    def _hidden(self, history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Last hidden states ``[B, T, H]`` of the spliced prompts and each row's last real index ``[B]``."""
        embed = self.lm.get_input_embeddings()
        vectors = self.item_encoder(history).to(embed.weight.dtype)
        inputs_embeds, position_ids, last = self.prompt(embed, vectors, mask)
        # No attention mask: padding sits right of every row's real tokens, so causal attention alone keeps it
        # out of every state that is read, and the backbone runs SDPA's causal (flash) kernel with no mask.
        out = self.run_decoder(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state, last

    def forward(self, history: Tensor, mask: Tensor) -> Tensor:
        """The user state ``[B, H]``: the backbone's last hidden state at each prompt's final real token (the
        last history item under ``readout: item``, whose prompt has no suffix)."""
        # The most recent max_len items. No data-dependent trimming: a host sync per step would stall the GPU.
        history, mask = history[:, -self.max_len:], mask[:, -self.max_len:]
        hidden, last = self._hidden(history, mask)
        return hidden[torch.arange(len(last), device=last.device), last]

    def item_states(self, history: Tensor, mask: Tensor) -> Tensor:
        """``[B, L, H]``: the user state after each history item (``readout: item``); rows where ``mask`` is
        False hold the prefix's first state and must be ignored. Causal attention makes state ``j`` that of
        a prompt holding items ``..j`` only."""
        history, mask = history[:, -self.max_len:], mask[:, -self.max_len:]
        hidden, _ = self._hidden(history, mask)
        positions = self.prompt.item_positions(mask)
        return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def score_batch(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B, num_items]`` float32 scores (the evaluation protocol of ``mmrec test``)."""
        with torch.no_grad():
            return self.fusion(self(batch["history"], batch["mask"]))

    def tokens_in(self, batch: dict[str, Tensor]) -> Tensor:
        """Prompt tokens the backbone reads for ``batch``, padding excluded (for throughput)."""
        mask = batch["mask"][:, -self.max_len:]
        return mask.sum() + mask.shape[0] * self.prompt.num_text_tokens

    # ---- Lightning ---------------------------------------------------------------------------------

    def train_modes(self) -> tuple[str, ...]:
        return ("prefix", "shifted") if self.hparams.readout == "item" else ("prefix",)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if "targets" in batch:  # shifted: every prefix of each user's sequence in one pass (readout: item)
            states = self.item_states(batch["history"], batch["mask"])
            targets = batch["targets"][:, -self.max_len:].flatten()  # -100 on padding: no sync to drop those rows
            logits = self.fusion(states.flatten(0, 1), self._cold_start_items())
        else:
            logits, targets = self.fusion(self(batch["history"], batch["mask"]), self._cold_start_items()), batch["target"]
        if self.hparams.train_catalog == "seen":
            logits = self.fusion.seen_only(logits)
        loss = F.cross_entropy(logits, targets, ignore_index=-100)
        if self.hparams.distill_weight:
            loss = self._distilled(loss, logits, targets, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["history"]))
        return loss

    def _cold_start_items(self) -> Tensor | None:
        """``[N]`` bool: the items this training step scores by content alone (``cold_start_dropout``)."""
        share = self.hparams.cold_start_dropout
        if not share:
            return None
        return torch.rand(self.num_items, device=self.fusion.frequency.device) < share

    def _distilled(self, ce: Tensor, logits: Tensor, targets: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """``(1 - w) * ce + w * T^2 * KL(teacher || student)``, the KL averaged over the rows of ``logits`` that
        are real prefixes (target not -100); both terms are logged."""
        weight, temperature = self.hparams.distill_weight, self.hparams.distill_temperature
        columns = self.fusion.trained if self.hparams.train_catalog == "seen" else None
        distill = distillation_loss(logits, self._teacher_logits(batch), temperature, targets != -100, columns)
        self.log("train/ce", ce, batch_size=len(batch["history"]))
        self.log("train/distill", distill, batch_size=len(batch["history"]))
        return (1 - weight) * ce + weight * distill

    def _teacher_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """The teacher's scores in the rows of the student's logits: after each prompt's history, or in a
        shifted batch after every position; it reads the same most recent ``max_len`` items as the student."""
        if self.teacher is None:
            raise InputError("model.distill_weight > 0 needs the trained SASRec among the inputs (RecommenderInputs.teacher)")
        history, mask = batch["history"][:, -self.max_len:], batch["mask"][:, -self.max_len:]
        if "targets" in batch:
            return self.teacher.prefix_logits(history, mask).flatten(0, 1)
        return self.teacher.next_item_logits(history, mask)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        scores = self.score_batch(batch)
        if not bool(torch.isfinite(scores).all()):  # NaN would rank every target last, silently
            raise TrainingError("the recommender's scores are not finite: training diverged (lower model.lr / model.lora_lr) "
                                "or the backbone produced NaN in this dtype")
        self.val_metrics.update(target_ranks(scores, batch["target"]))

