"""LoRA on the frozen backbone (peft), with MME-SID's settings as defaults.

Only the adapter is trained and saved (peft's own format, ``adapter_model.safetensors`` +
``adapter_config.json``), so a fine-tuned recommender ships a few MB instead of a copy of the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model, set_peft_model_state_dict
from torch import Tensor
from transformers import PreTrainedModel

from mmrec.errors import InputError


@dataclass(frozen=True)
class LoRASpec:
    """LoRA hyper-parameters (MME-SID: r=8, alpha=16, dropout 0.05 on the MLP projections).

    Args:
        r: rank of the update; 0 trains no adapter (backbone fully frozen).
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter's input.
        target_modules: names of the linear layers that get an adapter.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])


def add_lora(
    model: PreTrainedModel, spec: LoRASpec, trainable_tokens: list[int] | None = None
) -> PreTrainedModel | PeftModel:
    """Wrap ``model`` with a fresh adapter; every base weight stays frozen.

    ``trainable_tokens``: rows of the input embedding to train as well (new tokens added to the vocabulary);
    peft keeps their values in the adapter (``trainable_token_indices``), so the matrix itself stays frozen
    and the export stays small. With ``r == 0`` only those rows are trained.
    """
    if spec.r == 0 and not trainable_tokens:
        return model
    if spec.r == 0:
        return get_peft_model(model, TrainableTokensConfig(token_indices=list(trainable_tokens)))
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.target_modules),
        bias="none", trainable_token_indices=list(trainable_tokens) if trainable_tokens else None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft's message when no target module matches
        raise InputError(f"model.lora.target_modules {list(spec.target_modules)}: {exc}") from None


def set_adapter_state(model: PeftModel, state: dict[str, Tensor]) -> list[str]:
    """Load adapter tensors saved by ``save_pretrained`` into an adapter built from the same spec; return the
    names that do not fit it (missing adapter tensors first, then unexpected ones), empty when all loaded."""
    result = set_peft_model_state_dict(model, state)
    # A tied output layer shares its trainable-token rows with the input embedding: loaded through the latter.
    params = dict(model.named_parameters(remove_duplicate=False))
    absent = set(result.missing_keys)
    loaded = {id(param) for name, param in params.items() if name not in absent}
    missing = [
        key for key in result.missing_keys
        if ("lora_" in key or "trainable_tokens_delta" in key) and id(params.get(key)) not in loaded
    ]
    return missing + list(result.unexpected_keys)
