"""What the two LLM recommenders share: a frozen backbone with LoRA, training only mmrec's own tensors, the
validation metric, and the export that ``mmrec test`` reloads.

The heads differ in what the backbone reads and writes. :class:`~mmrec.models.llm.recommender.LLMRecommender`
(MME-SID, ``fusion``) reads one vector per history item and scores the whole catalog;
:class:`~mmrec.models.llm.generative.GenerativeRecommender` (TIGER / LC-Rec, ``generative``) reads and writes
semantic-ID tokens and decodes items by beam search. Both train LoRA (and the generative head its new token
rows) on a backbone that stays frozen, so checkpoints and exports keep only the trained tensors and the
backbone is rebuilt from its source on reload. Both take the backbone loaded
(:class:`~mmrec.models.llm.backbone.Backbone`, from :func:`~mmrec.models.llm.backbone.load_backbone`) and
record its spec in their hyperparameters; they read no file.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmrec.artifacts import Stage
from mmrec.data.recommender_inputs import InputNeeds, RecommenderInputs, SIDCodes
from mmrec.errors import InputError, MMRecError
from mmrec.metrics.ranking import RankingMetrics
from mmrec.models.compiled import CompiledBlocks
from mmrec.models.llm.backbone import TINY, Backbone
from mmrec.models.llm.lora import LoRASpec, add_lora, set_adapter_state
from mmrec.models.llm.prompt import PromptSpec, prompt_token_ids

DEFAULT_BACKBONE, DEFAULT_LORA = Backbone(), LoRASpec()  # frozen: safe defaults
"""``DEFAULT_BACKBONE``: the ``tiny`` spec, not loaded: what a config without ``model.backbone`` gets (the stage
loads it); a model built in Python is given ``load_backbone(spec)``."""
STAGE = str(Stage.FIT_RECOMMENDER)
SPEC_FORMAT = "mmrec.llm-recommender/2"
"""``recommender.json``'s format; /2 records ``num_items`` beside the hyperparameters, /1 (still read) inside them."""
MONITOR = "val/ndcg@10"
_TOKEN_ROWS = "trainable_tokens_delta"  # peft's name for the trained rows of new tokens
_FSDP_WRAPPERS = re.compile(r"_(?:fsdp|checkpoint)_wrapped_module\.")  # FSDP's and activation checkpointing's
_WRAPPED = re.compile(r"\.(?:token_adapter\.)?base_layer\.")  # peft's wrappers around a LoRA layer / new token rows


class TrainingError(MMRecError):
    """Training produced a model that cannot be used (non-finite scores)."""


class LLMRecommenderBase(L.LightningModule):
    """Backbone, LoRA, optimiser, trained-tensor checkpoints and export; subclasses add a head.

    A subclass's ``__init__`` calls ``save_hyperparameters(ignore=["inputs", "backbone"])`` and :meth:`_prepare`
    first (the catalog's tensors and the loaded backbone stay out of the hyperparameters, the backbone's spec
    goes in; validation metric), then :meth:`_attach_backbone` with the (possibly extended) backbone, and names
    the prefixes of its own trained modules in ``trained_prefixes`` (saved in ``heads.safetensors``).
    """

    head: ClassVar[str]
    """The value of ``recommender.json``'s ``head``: which class the loader must rebuild."""
    export_folder: ClassVar[str]
    """The run-directory folder the stage exports this head to, so both heads' exports can sit side by side."""
    trained_prefixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def input_needs(cls, hparams: Mapping[str, Any]) -> InputNeeds:
        """The catalog inputs a model of these constructor arguments reads (what a stage loads for it)."""
        raise NotImplementedError

    def _prepare(self, inputs: RecommenderInputs, backbone: Backbone, ks: list[int]) -> None:
        """Call right after ``self.save_hyperparameters(ignore=["inputs", "backbone"])``."""
        backbone.require_loaded()
        # the backbone's spec, where the constructor takes the backbone (the order recommender.json keeps)
        values = {**self.hparams, "backbone": backbone.spec}
        order = [name for name in inspect.signature(type(self).__init__).parameters if name in values]
        for key in ("backbone", "lora", "prompt"):  # plain dicts: JSON-able, and checkpoints unpickle safely
            if is_dataclass(values.get(key)):
                values[key] = asdict(values[key])
        self.hparams.clear()
        self.save_hyperparameters({name: values[name] for name in order})
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self.num_items = inputs.num_items
        self.val_metrics = RankingMetrics(sorted(set(ks) | {10}))  # NDCG@10 picks the best checkpoint

    def _attach_backbone(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lora: LoRASpec, prompt: PromptSpec,
        trainable_tokens: list[int] | None = None,
    ) -> None:
        self.backbone_parameters = sum(p.numel() for p in model.parameters())  # before any adapter or sharding
        if self.full_finetune:
            self.lm = model.requires_grad_(True).train()  # new token rows are rows of the trained embedding
        else:
            self.lm = add_lora(model, lora, trainable_tokens).train()  # from_pretrained returns eval mode; dropout needs train
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_token_ids(tokenizer, prompt)
        self._compiled_layers: CompiledBlocks | None = None

    @property
    def full_finetune(self) -> bool:
        """Whether every backbone weight trains (``backbone.finetune: full``) rather than a LoRA adapter."""
        return self.hparams.backbone.get("finetune", "lora") == "full"

    @property
    def exported_prefixes(self) -> tuple[str, ...]:
        """Prefixes of the trained parameters that ``heads.safetensors`` holds: the heads, and the whole
        backbone when it was fully fine-tuned (a LoRA adapter is saved in peft's format instead)."""
        return self.trained_prefixes + (("lm.",) if self.full_finetune else ())

    def run_decoder(self, **inputs: Any) -> Any:
        """The backbone's decoder on ``inputs``; in training with ``backbone.compile`` its decoder layers run
        through one compiled graph (:class:`~mmrec.models.compiled.CompiledBlocks`).

        Only training steps are compiled: evaluation has other shapes and no autograd, and compiling those
        too would spend the time budget on graphs that run once an epoch. The compiled graph lives outside
        the module tree, so state dicts and checkpoints keep their keys.
        """
        decoder = self.decoder()
        if not (self.training and self.hparams.backbone.get("compile", False)):
            return decoder(**inputs)
        if self._compiled_layers is None:
            self._compiled_layers = CompiledBlocks(decoder.layers, "the backbone's training forward")
        with self._compiled_layers.active():
            return decoder(**inputs)

    @staticmethod
    def _sids(inputs: RecommenderInputs, name: str) -> SIDCodes:
        """One modality's SIDs and codebooks, refused when the inputs lack them."""
        if name not in inputs.sids or not inputs.sids[name].codebooks:
            raise InputError(f"the inputs hold no SIDs with codebooks for modality '{name}' (they have {sorted(inputs.sids)})")
        return inputs.sids[name]

    def decoder(self) -> nn.Module:
        """The backbone without its language-model head (LoRA layers included)."""
        return self.base_model().get_decoder()

    def base_model(self) -> PreTrainedModel:
        return self.lm.get_base_model() if isinstance(self.lm, PeftModel) else self.lm

    # ---- Lightning ---------------------------------------------------------------------------------

    def train_modes(self) -> tuple[str, ...]:
        """The ``SequenceDataModule.train_mode`` values this model can train on."""
        return ("prefix",)

    def setup(self, stage: str) -> None:
        """Refuse a data module whose training samples this model cannot read, before any step runs."""
        mode = getattr(self.trainer.datamodule, "train_mode", None) if stage == "fit" else None
        if mode is not None and mode not in self.train_modes():
            raise InputError(
                f"data.train_mode={mode} does not suit this model (it trains on {' or '.join(self.train_modes())}); "
                "train_mode=shifted needs the fusion head with model.readout=item"
            )

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.log_dict({f"val/{name}": value.float() for name, value in values.items()})
        self.val_metrics.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with two learning rates: ``lr`` for mmrec's modules and new token rows, ``lora_lr`` for the
        backbone (LoRA, or every weight under ``finetune: full``)."""
        heads, adapter = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (heads if self._head_rate(name) else adapter).append(param)
        groups = [{"params": heads, "lr": self.hparams.lr}] if heads else []
        if adapter:
            groups.append({"params": adapter, "lr": self.hparams.lora_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_ratio * total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _head_rate(self, name: str) -> bool:
        """Whether parameter ``name`` trains at ``lr`` (mmrec's modules, new token rows) rather than at
        ``lora_lr`` (the backbone: its LoRA adapter, or all of it under ``finetune: full``)."""
        return not name.startswith("lm.") or _TOKEN_ROWS in name

    def trainable_names(self) -> set[str]:
        """Names of the trained parameters, as state dicts and checkpoints spell them (FSDP's wrappers left out)."""
        return {_FSDP_WRAPPERS.sub("", name) for name, param in self.named_parameters() if param.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trained tensors: the frozen backbone (hundreds of MB) is rebuilt from its source."""
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" not in checkpoint:  # FSDP has loaded the tensors itself and taken them out
            return
        missing = self.trainable_names() - set(checkpoint["state_dict"])
        if missing:
            raise InputError(f"checkpoint lacks trained tensors of this model (e.g. {min(missing)}); was it written by another configuration?")

    # ---- export and reload: the spec and tensors that mmrec.artifacts.exports writes and reads ----------

    def spec(self, trained: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """Everything the loader (``mmrec.evaluation.llm_loaders``) needs to rebuild this model (``recommender.json``);
        parameters counted in ``trained`` (a full state dict) where given, not in FSDP's shards."""
        arguments = set(inspect.signature(type(self).__init__).parameters) - {"self", "inputs"}
        hparams = {key: value for key, value in self.hparams.items() if key in arguments}
        return {
            "format": SPEC_FORMAT,
            "head": self.head,
            "num_items": self.num_items,
            "hparams": json.loads(json.dumps(hparams, default=list)),
            "hidden_size": int(self.lm.config.hidden_size),
            "prompt_tokens": {"prefix": list(self.prompt_ids[0]), "suffix": list(self.prompt_ids[1])},
            "trainable_parameters": sum(trained[name].numel() for name in self.trainable_names()) if trained is not None
            else sum(p.numel() for p in self.parameters() if p.requires_grad),
            "backbone_parameters": self.backbone_parameters,
        }

    def heads_state(self, trained: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The tensors of ``heads.safetensors``: from ``trained`` (a full state dict) or the live parameters."""
        source = trained if trained is not None else dict(self.named_parameters())
        keep = self.trainable_names()
        return {k: v.detach().cpu().contiguous() for k, v in source.items() if k.startswith(self.exported_prefixes) and k in keep}

    def adapter_state(self, trained: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The adapter's trained tensors (LoRA, new token rows) named as peft's ``save_pretrained`` writes them,
        from ``trained`` (a full state dict) or the live parameters.

        Not through peft's own ``get_peft_model_state_dict``: it picks the adapter's tensors by the names of
        the live modules, and under FSDP those run through the wrapped decoder layers
        (``..._fsdp_wrapped_module.``), so it picks none and an empty adapter would be exported."""
        source = trained if trained is not None else {_FSDP_WRAPPERS.sub("", k): v for k, v in self.named_parameters()}
        adapter = re.compile(rf"\.{re.escape(self.lm.active_adapter)}(?=\.|$)")
        keep = self.trainable_names()
        return {
            adapter.sub("", key.removeprefix("lm.")): value.detach().cpu().contiguous()
            for key, value in source.items() if key.startswith("lm.") and key in keep
        }

    def load_adapter_state(self, state: dict[str, Tensor]) -> list[str]:
        """Load a saved adapter's tensors; return the names that do not fit this model's adapter (none: loaded)."""
        return set_adapter_state(self.lm, state)

    def standalone_backbone(self, trained: dict[str, Tensor] | None = None) -> PreTrainedModel | None:
        """The backbone without adapters when it exists nowhere else (the random ``tiny`` one), so that the
        export can carry it and the reload rebuild it; None for a backbone that is rebuilt from its source.

        Its tensors come from ``trained`` (a full state dict) where given: under FSDP the live ones are shards,
        and reading them would be a collective that only rank 0, which exports, would join.
        The new token rows keep their initial values (the adapter holds their trained values).
        """
        if self.hparams.backbone["name_or_path"] != TINY:
            return None
        base = self.base_model()
        if trained is None:
            source = base.state_dict()
        else:
            prefix = "lm.base_model.model." if isinstance(self.lm, PeftModel) else "lm."
            source = {key.removeprefix(prefix): value for key, value in trained.items() if key.startswith(prefix)}
        state = {
            _WRAPPED.sub(".", key): value for key, value in source.items()
            if "lora_" not in key and _TOKEN_ROWS not in key
        }
        clean = type(base)(base.config)
        clean.load_state_dict(state, strict=True)  # every backbone tensor, or an error: never a random one saved
        return clean
