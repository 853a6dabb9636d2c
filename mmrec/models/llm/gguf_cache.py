"""Convert a GGUF backbone once, then load the converted copy.

transformers reads a GGUF file by parsing its metadata three times (config, tokenizer, weights) and
de-quantizing every tensor on the CPU: about 15 s for SmolLM2-135M, paid by every stage that loads the
backbone (two trainings and two evaluations in the Beauty pipeline). The converted model and tokenizer are
saved once as a plain Hugging Face directory (float32 safetensors, ``tokenizer.json``) under
mmrec's cache folder (:mod:`mmrec.cache`: ``$MMREC_CACHE_DIR``, default ``~/.cache/mmrec``) and loaded from
there in well under a second.

The cache key is the GGUF file's content hash and the transformers version that converted it, so an edited
file or a new converter never reads a stale copy. The copy holds what ``from_pretrained`` de-quantized, in
float32, so loading it gives the same weights as reading the GGUF (in any ``dtype``: the cast happens on
load, as it does for the GGUF). A cache that cannot be written (read-only home) falls back to reading the
GGUF directly, with a warning.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import warnings
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from mmrec.artifacts.manifest import file_sha256
from mmrec.cache import cache_root


@functools.cache
def gguf_sha256(gguf_path: Path) -> str:
    """The file's SHA-256, computed once a process: the conversion cache and the text-refinement cache both key
    on it, and a GGUF can be gigabytes."""
    return file_sha256(gguf_path)


def converted_dir(gguf_path: Path) -> Path:
    """The cache folder for ``gguf_path`` (it may not exist yet)."""
    key = f"{gguf_sha256(gguf_path)[:16]}-transformers{transformers.__version__}"
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key}"


def converted_backbone(directory: str, gguf_file: str, trust_remote_code: bool = False) -> str | None:
    """A Hugging Face directory holding the model and tokenizer of ``directory/gguf_file``, converted on the
    first call and reused after; None where the cache cannot be written (read the GGUF itself then)."""
    source = Path(directory) / gguf_file
    target = converted_dir(source)
    if (target / "config.json").is_file():
        return str(target)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=gguf_file, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        staging.mkdir(parents=True, exist_ok=True)
        save_plain(model, staging)
        tokenizer.save_pretrained(staging)
        publish(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        warnings.warn(f"{target}: cannot cache the converted backbone ({exc}); reading the GGUF file directly", stacklevel=2)
        return None
    return str(target)


def plain_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of a model's config without the GGUF quantizer's entry: its weights are plain tensors by now."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def save_plain(model: PreTrainedModel, folder: Path) -> None:
    """Save a de-quantized model as a plain one: ``save_pretrained`` refuses a model loaded from GGUF (it
    keeps the GGUF quantizer attached), though its weights are ordinary float tensors by now."""
    config = plain_config(model.config)
    config.save_pretrained(folder)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied again to the input embedding on load
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(folder / "model.safetensors"))


def publish(staging: Path, target: Path) -> None:
    """Move a complete conversion into place; another process (a DDP rank) may have published it first."""
    try:
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)
