"""A GGUF backbone is converted once and read from the cache after, with the same weights and tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmrec.cache import CACHE_ENV, cache_root
from mmrec.models.llm import gguf_cache
from mmrec.models.llm.backbone import BackboneSpec, load_backbone
from tests.fixtures import write_tiny_gguf

TEXT = "Purchase history: lipstick, mascara. Next purchase?"


@pytest.fixture()
def tiny_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
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
    assert [p.name for p in (cache_root() / "gguf").iterdir()] == [gguf_cache.converted_dir(tiny_gguf).name]
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
    monkeypatch.setenv(CACHE_ENV, str(blocker))
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


def test_random_weights_keep_the_shape_and_tokenizer_and_are_the_same_at_every_load(tiny_gguf: Path) -> None:
    pretrained, ids = _logits(BackboneSpec(name_or_path=str(tiny_gguf)))
    random, random_ids = _logits(BackboneSpec(name_or_path=str(tiny_gguf), weights="random"))
    again, _ = _logits(BackboneSpec(name_or_path=str(tiny_gguf), weights="random"))
    assert random_ids == ids and random.shape == pretrained.shape
    assert not torch.allclose(random, pretrained) and torch.equal(random, again)
