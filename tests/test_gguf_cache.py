"""A GGUF backbone is converted once and read from the cache after, with the same weights and tokenizer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmrec.models.llm import gguf_cache
from mmrec.models.llm.backbone import BackboneSpec, load_backbone, tiny_backbone

TEXT = "Purchase history: lipstick, mascara. Next purchase?"


def _heads_first(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout of a q/k projection (transformers undoes it when reading a GGUF)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, seed_offset: float = 0.0) -> None:
    """The ``tiny`` backbone as a float32 llama GGUF (``seed_offset`` shifts one weight: another file)."""
    model, tokenizer = tiny_backbone()
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    special = set(tokenizer.all_special_tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    state = {name: tensor.float().numpy() for name, tensor in model.state_dict().items()}
    state["model.norm.weight"] = state["model.norm.weight"] + seed_offset
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for layer in range(config.num_hidden_layers):
        ours = f"model.layers.{layer}."
        for hf_name, gguf_name in names.items():
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", state[f"{ours}{hf_name}.weight"])
        writer.add_tensor(f"blk.{layer}.attn_q.weight", _heads_first(state[f"{ours}self_attn.q_proj.weight"], config.num_attention_heads))
        writer.add_tensor(f"blk.{layer}.attn_k.weight", _heads_first(state[f"{ours}self_attn.k_proj.weight"], config.num_key_value_heads))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture()
def tiny_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path)
    return path


def _logits(spec: BackboneSpec) -> tuple[torch.Tensor, list[int]]:
    backbone = load_backbone(spec)
    model, tokenizer = backbone.require_loaded()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits, ids[0].tolist()


def test_the_first_load_converts_and_later_loads_read_the_copy_with_the_same_weights_and_tokens(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32)
    direct_ids = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)(TEXT).input_ids
    spec = BackboneSpec(name_or_path=str(tiny_gguf))

    first, first_ids = _logits(spec)
    assert [p.name for p in (gguf_cache.cache_root() / "gguf").iterdir()] == [gguf_cache.converted_dir(tiny_gguf).name]
    with torch.no_grad():
        assert torch.equal(first, direct(torch.tensor([direct_ids])).logits)
    assert first_ids == direct_ids

    class NoConversion:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> None:
            raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(gguf_cache, "AutoModelForCausalLM", NoConversion)
    second, second_ids = _logits(spec)
    assert torch.equal(second, first) and second_ids == first_ids


def test_another_file_gets_another_cache_entry(tiny_gguf: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "tiny.gguf"
    other.parent.mkdir()
    write_tiny_gguf(other, seed_offset=0.5)
    assert gguf_cache.converted_dir(other) != gguf_cache.converted_dir(tiny_gguf)
    first, _ = _logits(BackboneSpec(name_or_path=str(tiny_gguf)))
    second, _ = _logits(BackboneSpec(name_or_path=str(other)))
    assert not torch.equal(first, second)


def test_a_cache_that_cannot_be_written_falls_back_to_reading_the_gguf(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(blocker))
    with pytest.warns(UserWarning, match="reading the GGUF file directly"):
        logits, _ = _logits(BackboneSpec(name_or_path=str(tiny_gguf)))
    assert logits.shape[-1] > 0 and not list(tmp_path.glob("**/*.tmp-*"))


def test_a_conversion_published_first_by_another_process_is_kept(tmp_path: Path) -> None:
    target, staging = tmp_path / "entry", tmp_path / "entry.tmp-1"
    for folder, text in ((target, "theirs"), (staging, "ours")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    gguf_cache.publish(staging, target)
    assert (target / "config.json").read_text() == "theirs" and not staging.exists()
