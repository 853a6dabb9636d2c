"""The generative SID head (TIGER, LC-Rec): the LLM reads the history as semantic-ID tokens and writes the
next item's SID token by token; items are decoded by beam search constrained to the catalog's SIDs.

One sample, in the backbone's chat template (``[...]`` are token spans)::

    [template + system + instruction] <a_3><b_17><c_5><d_0>, <a_9><b_2><c_41><d_0>, ... [question + assistant header] <a_7><b_7><c_1><d_0>

With ``with_titles`` each history item's SID is followed by the first ``title_tokens`` tokens of its text
(LC-Rec style). The loss is cross-entropy on the target SID's tokens only, each over its own level's codes
(the SID tokens' embeddings are also their output weights, whether or not the backbone ties its own), so a
step's log-probs are a distribution over that level's codes and an item's score, the sum over levels, is
its log-probability as an SID. Decoding (:meth:`GenerativeRecommender.topk_batch`) runs the prompt once,
then one cached step per level for ``num_beams`` beams per user (:mod:`mmrec.models.llm.sid_trie`); with
``renormalize`` an item's score is its SID's probability among the catalog's SIDs instead.

Trained: LoRA and the new SID token rows (peft's ``trainable_token_indices``: the embedding matrix stays
frozen, the rows' values live in the adapter). Items without an SID in ``sid_modality`` are left out of
histories and can never be recommended.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mmrec.data.recommender_inputs import InputNeeds, RecommenderInputs
from mmrec.errors import InputError
from mmrec.metrics.ranking import DEFAULT_K, list_ranks
from mmrec.models.llm.backbone import Backbone
from mmrec.models.llm.base import (
    DEFAULT_BACKBONE,
    DEFAULT_LORA,
    STAGE,
    LLMRecommenderBase,
    TrainingError,
)
from mmrec.models.llm.lora import LoRASpec
from mmrec.models.llm.prompt import PromptSpec, padding_last
from mmrec.models.llm.sid_tokens import SIDVocabulary, add_sid_tokens, initial_token_embeddings
from mmrec.models.llm.sid_trie import SIDTrie, constrained_beam_search

DEFAULT_PROMPT = PromptSpec(question="Predict the semantic ID of the next item.")


class GenerativeRecommender(LLMRecommenderBase):
    """A LoRA-tuned causal LM that generates the next item's semantic ID.

    Args:
        inputs: the catalog's tensors: the SIDs of ``sid_modality`` and, with ``with_titles``, the item texts
            (built by the data module from the run folder and linked in by ``fit-recommender``).
        max_len: most recent history items read (linked from ``data.max_len``).
        backbone: the causal LM and its tokenizer, loaded (:func:`~mmrec.models.llm.backbone.load_backbone`;
            see :class:`~mmrec.models.llm.backbone.BackboneSpec` for what it loads). Its spec is recorded in the
            hyperparameters. ``fit-recommender`` loads ``model.backbone`` itself; the default is the ``tiny``
            spec unloaded, which the stage loads and a direct call refuses. This head changes the backbone
            it is given, in memory: it adds the SID tokens to the tokenizer and resizes the embedding.
        lora: LoRA settings (see :class:`~mmrec.models.llm.lora.LoRASpec`).
        prompt: instruction texts around the history (see :class:`~mmrec.models.llm.prompt.PromptSpec`).
        sid_modality: whose SIDs the model reads and writes (``collab``, ``text`` or ``image``).
        code_init: ``codebook`` initialises each SID token from its code vector (see
            :mod:`~mmrec.models.llm.sid_tokens`); ``random`` is the ablation.
        with_titles: follow each history item's SID with the start of its text (LC-Rec style).
        title_tokens: how many tokens of each item's text ``with_titles`` keeps.
        item_separator: text between history items (``", "`` reads naturally; ``","`` is one token less).
        num_beams: beams of the constrained beam search (at least the list length asked for).
        renormalize: score each SID by its probability among the catalog's SIDs (each level's log-probs
            normalised again over the codes the catalog allows after the beam's prefix), not by the model's
            log-probability of it (see :mod:`~mmrec.models.llm.sid_trie`). A decoding choice: training is the
            same either way, and ``mmrec test --renormalize`` may change it.
        lr: learning rate of the SID token rows.
        lora_lr: learning rate of the LoRA adapter.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the training steps with a linear learning-rate warm-up (cosine decay after).
        ks: cutoffs of the validation metrics (validation decodes ``max(ks)`` items per user).
    """

    head = "generative"
    export_folder = f"{STAGE}-generative"

    def __init__(
        self,
        inputs: RecommenderInputs,
        max_len: int = 20,
        backbone: Backbone = DEFAULT_BACKBONE,
        lora: LoRASpec = DEFAULT_LORA,
        prompt: PromptSpec = DEFAULT_PROMPT,
        sid_modality: Literal["collab", "text", "image"] = "collab",
        code_init: Literal["codebook", "random"] = "codebook",
        with_titles: bool = False,
        title_tokens: int = 12,
        item_separator: str = ", ",
        num_beams: int = 20,
        renormalize: bool = False,
        lr: float = 1e-3,
        lora_lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        ks: list[int] = list(DEFAULT_K),  # noqa: B006 (jsonargparse needs a literal default)
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["inputs", "backbone"])
        self._prepare(inputs, backbone, ks)
        self.max_len, self.num_beams, self.renormalize = max_len, num_beams, renormalize
        sids = self._sids(inputs, sid_modality)
        codes, codebooks = sids.codes, sids.codebooks
        self.vocab = SIDVocabulary.from_codes(codes, codebooks, sids.source)

        model, tokenizer = backbone.require_loaded()
        token_ids = add_sid_tokens(tokenizer, model, self.vocab)
        embedding = model.get_input_embeddings().weight
        original = embedding.detach()[: int(token_ids.min())]  # the backbone's own tokens set the scale
        rows, _, _ = initial_token_embeddings(self.vocab, codebooks, original, code_init)
        with torch.no_grad():
            embedding[token_ids.to(embedding.device)] = rows.to(embedding.device, embedding.dtype)
        self._attach_backbone(model, tokenizer, lora, prompt, trainable_tokens=token_ids.tolist())
        self.register_buffer("sid_token_ids", token_ids, persistent=False)
        self.register_buffer("item_codes", self.vocab.codes, persistent=False)
        self.register_buffer("item_sid_rows", self.vocab.item_token_rows(), persistent=False)
        self.register_buffer("level_starts", torch.tensor(self.vocab.offsets, dtype=torch.long), persistent=False)
        if with_titles and inputs.item_texts is None:
            raise InputError("model.with_titles needs the item texts among the inputs")
        titles = inputs.item_texts if with_titles else None
        self.register_buffer("item_tokens", self._item_token_table(tokenizer, token_ids, titles), persistent=False)
        self.register_buffer("prefix_ids", torch.tensor(self.prompt_ids[0], dtype=torch.long), persistent=False)
        self.register_buffer("suffix_ids", torch.tensor(self.prompt_ids[1], dtype=torch.long), persistent=False)
        self.trie = SIDTrie(self.vocab.codes, self.vocab.level_sizes)
        # any item with an SID: the stand-in target of samples whose own target has none (weighted out)
        self.writable_item = int(torch.nonzero((self.vocab.codes >= 0).all(dim=1))[0, 0])

    @classmethod
    def input_needs(cls, hparams: Mapping[str, Any]) -> InputNeeds:
        """The SIDs of ``sid_modality``, and the item texts with ``with_titles``."""
        return InputNeeds(sid_modalities=(hparams.get("sid_modality", "collab"),), item_texts=bool(hparams.get("with_titles")))

    def _item_token_table(self, tokenizer: PreTrainedTokenizerBase, token_ids: Tensor, titles: list[str] | None) -> Tensor:
        """``[N, W]`` the tokens each history item contributes (its SID, its title, a separator); -1 pads."""
        rows = self.vocab.item_token_rows()
        sid = torch.where(rows >= 0, token_ids[rows.clamp(min=0)], -1)
        separator = tokenizer(self.hparams.item_separator, add_special_tokens=False)["input_ids"]
        parts = [sid]
        if titles is not None:
            limit = self.hparams.title_tokens
            encoded = tokenizer([" " + title for title in titles], add_special_tokens=False)["input_ids"]
            title = torch.full((len(titles), limit), -1, dtype=torch.long)
            for item, ids in enumerate(encoded):
                title[item, :len(ids[:limit])] = torch.tensor(ids[:limit], dtype=torch.long)
            parts.append(title)
        parts.append(torch.tensor(separator, dtype=torch.long).expand(len(sid), -1))
        table = torch.cat(parts, dim=1)
        return table.masked_fill((sid < 0).any(dim=1, keepdim=True), -1)  # no SID: the item is left out

    # ---- sequences ---------------------------------------------------------------------------------

    def _sequences(self, history: Tensor, mask: Tensor, target: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded ``input_ids [B, T]``, ``attention_mask [B, T]`` and ``lengths [B]`` of the prompts
        (with the target SID's tokens appended when ``target`` is given)."""
        history, mask = history[:, -self.max_len:], mask[:, -self.max_len:]
        batch = history.shape[0]
        items = self.item_tokens[history].masked_fill(~mask.unsqueeze(-1), -1).flatten(1)
        parts = [self.prefix_ids.expand(batch, -1), items, self.suffix_ids.expand(batch, -1)]
        if target is not None:
            parts.append(self.sid_token_ids[self.item_sid_rows[target]])
        ids = torch.cat(parts, dim=1)
        valid = ids >= 0
        order = padding_last(valid)
        ids, valid = ids.gather(1, order), valid.gather(1, order)
        return ids.clamp(min=0), valid.long(), valid.sum(dim=1)

    def level_logprobs(self, hidden: Tensor, level: int) -> Tensor:
        """Log-probs over level ``level``'s codes from hidden states ``[..., H]`` (float32)."""
        start, size = self.vocab.offsets[level], self.vocab.level_sizes[level]
        weights = self.lm.get_input_embeddings()(self.sid_token_ids[start:start + size])
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # 256-way softmax in float32
            return torch.log_softmax(hidden.float() @ weights.float().T, dim=-1)

    def sid_logprobs(self, history: Tensor, mask: Tensor, target: Tensor) -> Tensor:
        """``[B, L]`` log-prob of each of ``target``'s SID tokens, teacher-forced (the training objective;
        summed over levels, the exact score of ``target``)."""
        levels = self.vocab.num_levels
        ids, _, lengths = self._sequences(history, mask, target)
        # Right padding and causal attention: no mask needed (see mmrec.models.llm.prompt), so SDPA runs its
        # causal kernel; compiled in training when backbone.compile is set.
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        hidden = self.run_decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        rows = torch.arange(len(ids), device=ids.device)
        codes = self.item_codes[target]
        out = []
        for level in range(levels):
            state = hidden[rows, lengths - levels - 1 + level]  # the token before the level's token predicts it
            out.append(self.level_logprobs(state, level).gather(1, codes[:, level:level + 1]).squeeze(1))
        return torch.stack(out, dim=1)

    def _head_rate(self, name: str) -> bool:
        """Under ``finetune: full`` the SID token rows are rows of the trained input embedding, which then
        trains at ``lr`` as the rows do under LoRA (they start far from where the backbone's tokens are)."""
        return super()._head_rate(name) or (self.full_finetune and name.endswith("embed_tokens.weight"))

    # ---- decoding ----------------------------------------------------------------------------------

    def unrankable_items(self) -> Tensor:
        """``[N]`` bool: the items without an SID in ``sid_modality``, which beam search can never write (with
        ``collab``: every item never seen in training, whose SASRec row is exported absent)."""
        return (self.item_codes < 0).any(dim=1)

    def beam_width(self, k: int) -> int:
        """``max(k, num_beams)``: a list of ``k`` distinct items needs at least ``k`` beams."""
        return max(k, self.num_beams)

    def topk_batch(self, batch: dict[str, Tensor], k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` best distinct items per user by constrained beam search (:meth:`beam_width` beams)."""
        with torch.no_grad():
            items, scores = self.decode(batch["history"], batch["mask"], self.beam_width(k))
        return items[:, :k], scores[:, :k]

    def decode(self, history: Tensor, mask: Tensor, num_beams: int) -> tuple[Tensor, Tensor]:
        """Constrained beam search: ``(items [B, num_beams], log-prob scores [B, num_beams])``, best first.

        Tree attention: the prompt's cache keeps one row per user and is never copied per beam (gathering it
        to ``B x num_beams`` rows at every level moved tens of GB per batch). At each level the codes just
        chosen are appended to their user's row as ``num_beams`` new slots; a 4D mask lets each new token see
        its user's real prompt tokens (not the padding), the slots of its own ancestors and itself, and its
        position id is its SID level's in the training layout (prompt length + depth - 1): RoPE reads only
        position ids, so each beam's hidden state is the one its own sequence would give.
        """
        attention = self.base_model().config._attn_implementation
        if attention not in ("sdpa", "eager"):
            raise InputError(f"generative decoding needs a 4D attention mask: use backbone.attn_implementation sdpa, not {attention}")
        ids, attention_mask, lengths = self._sequences(history, mask)
        batch, device = len(ids), ids.device
        # Right padding and causal attention: the prompt pass needs no mask (SDPA's causal kernel), and the
        # beams' mask below hides the padding's slots.
        positions = torch.arange(ids.shape[1], device=device).expand(batch, -1)
        decoder = self.decoder()
        # transformers renamed the cache argument and output (past_key_values -> cache; the old name goes in
        # 5.40): use whichever this version's decoder takes
        cache_name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        out = decoder(input_ids=ids, position_ids=positions, use_cache=True)
        cache = out[cache_name]
        first = out.last_hidden_state[torch.arange(batch, device=device), lengths - 1]
        prompt = attention_mask.bool().unsqueeze(1)  # [B, 1, T]: what every beam of a user sees of the prompt
        own = torch.eye(num_beams, dtype=torch.bool, device=device).expand(batch, -1, -1)
        state = {"ancestors": own[:, :, :0]}  # [B, beams, slots after the prompt]: each beam's own path

        def step(depth: int, origin: Tensor | None, codes: Tensor | None) -> Tensor:
            if origin is None:
                return self.level_logprobs(first, 0).unsqueeze(1)
            before = state["ancestors"]
            state["ancestors"] = torch.cat([before.gather(1, origin.unsqueeze(-1).expand(-1, -1, before.shape[2])), own], dim=2)
            visible = torch.cat([prompt.expand(-1, num_beams, -1), state["ancestors"]], dim=2).unsqueeze(1)
            if attention == "eager":  # eager attention adds the mask to its logits
                visible = torch.zeros(visible.shape, device=device).masked_fill(~visible, torch.finfo(torch.float32).min)
            tokens = self.sid_token_ids[self.level_starts[depth - 1] + codes]
            positions = (lengths + depth - 1).unsqueeze(1).expand(-1, num_beams)
            hidden = decoder(
                input_ids=tokens, attention_mask=visible, position_ids=positions, use_cache=True, **{cache_name: cache},
            ).last_hidden_state
            return self.level_logprobs(hidden, depth)

        return constrained_beam_search(step, self.trie, batch, num_beams, ids.device, renormalize=self.renormalize)

    def tokens_in(self, batch: dict[str, Tensor]) -> Tensor:
        """Tokens the backbone reads for a training batch, padding excluded (for throughput)."""
        history, mask = batch["history"][:, -self.max_len:], batch["mask"][:, -self.max_len:]
        items = (self.item_tokens[history] >= 0) & mask.unsqueeze(-1)
        fixed = len(self.prefix_ids) + len(self.suffix_ids) + self.vocab.num_levels
        return items.sum() + history.shape[0] * fixed

    # ---- Lightning ---------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # A target without an SID cannot be written: weighted out of the loss rather than dropped from the
        # batch, since boolean indexing would wait for the GPU (a host sync) at every step.
        target = batch["target"]
        keep = (self.item_codes[target] >= 0).all(dim=1)
        logprobs = self.sid_logprobs(batch["history"], batch["mask"], torch.where(keep, target, self.writable_item))
        loss = -(logprobs.mean(dim=1) * keep).sum() / keep.sum().clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        items, scores = self.topk_batch(batch, max(self.val_metrics.k))
        if bool(torch.isnan(scores).any()):
            raise TrainingError("the generative head's beam scores are NaN: training diverged (lower model.lr / model.lora_lr)")
        self.val_metrics.update(list_ranks(items, scores, batch["target"]))

