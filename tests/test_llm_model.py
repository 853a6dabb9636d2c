"""The LLM recommender's parts on the tiny backbone: prompt splicing, padding invariance, fusion weights,
code-embedding initialisation, and adapter + heads export/reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmrec.artifacts.exports import load_llm_export, save_llm_export
from mmrec.data.datamodules import left_pad
from mmrec.data.prepared import load_sids
from mmrec.models.llm.fusion import FrequencyAwareFusion
from mmrec.models.llm.prompt import PromptSplicer
from tests.llm_helpers import tiny_model, write_sids

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def sid_run(tiny_run: Path) -> Path:
    write_sids(tiny_run)
    return tiny_run


def batch_of(histories: list[list[int]], max_len: int = 8) -> dict[str, torch.Tensor]:
    items, mask = left_pad([torch.tensor(h).numpy() for h in histories], max_len)
    return {"user_idx": torch.arange(len(histories)), "history": items, "mask": mask, "target": torch.zeros(len(histories), dtype=torch.long)}


def test_splicer_moves_padding_right() -> None:
    splicer = PromptSplicer(prefix_ids=[1, 2], suffix_ids=[3])
    embed = torch.nn.Embedding(10, 4)
    items = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) + 100
    mask = torch.tensor([[False, True, True], [True, True, True]])
    inputs, positions, last = splicer(embed, items, mask)
    assert inputs.shape == (2, 6, 4)
    assert last.tolist() == [4, 5] and positions[0, :5].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(inputs[0, -1], torch.zeros(4))  # padding is zeroed, and only after the last real token
    assert torch.allclose(inputs[0, 0], embed.weight[1]) and torch.allclose(inputs[0, 4], embed.weight[3])
    assert torch.equal(inputs[0, 2:4], items[0, 1:])  # the real items, in order, after the prefix


@pytest.mark.parametrize("readout", ["answer", "item"])
def test_a_users_scores_do_not_depend_on_padding_or_batch_composition(sid_run: Path, readout: str) -> None:
    model = tiny_model(sid_run, readout=readout).eval()
    user = [5, 9, 13]
    others = [[1, 2, 3, 4, 6, 7, 8, 10], [0], [11, 12, 14, 15, 16]]
    alone = model.score_batch(batch_of([user]))
    mixed = model.score_batch(batch_of([others[0], user, *others[1:]]))[1:2]
    assert torch.allclose(alone, mixed, atol=1e-5, rtol=1e-5)
    assert torch.equal(alone.topk(10).indices, mixed.topk(10).indices)


def test_item_positions_point_at_each_real_item_after_the_prefix() -> None:
    splicer = PromptSplicer(prefix_ids=[1, 2], suffix_ids=[])
    embed = torch.nn.Embedding(10, 4)
    items = torch.randn(2, 3, 4)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    inputs, _, last = splicer(embed, items, mask)
    positions = splicer.item_positions(mask)
    assert positions.tolist() == [[0, 2, 3], [2, 3, 4]]
    assert torch.equal(inputs[0, positions[0, 1:]], items[0, 1:]) and torch.equal(inputs[1, positions[1]], items[1])
    assert torch.equal(positions[:, -1], last)  # no suffix: the last item is the last real token


def test_item_readout_gives_every_prefix_the_state_of_its_own_prompt(sid_run: Path) -> None:
    """One pass over the whole sequence (``readout: item``, shifted training) = one prompt per prefix."""
    model = tiny_model(sid_run, readout="item").eval()
    sequence = [3, 7, 1, 12, 5]
    whole = batch_of([sequence, [2, 4]])
    with torch.no_grad():
        states = model.item_states(whole["history"], whole["mask"])[0, -len(sequence):]
        for t in range(1, len(sequence) + 1):
            prefix = batch_of([sequence[:t]])
            assert torch.allclose(states[t - 1], model(prefix["history"], prefix["mask"])[0], atol=1e-5, rtol=1e-5)
    assert model.prompt_ids[1] == [] and model.spec()["prompt_tokens"]["suffix"] == []


def test_shifted_training_loss_is_the_mean_of_the_prefix_losses(sid_run: Path) -> None:
    """The same samples and objective as ``train_mode=prefix``: cross-entropy averaged over every prefix."""
    model = tiny_model(sid_run, readout="item", dropout=0.0).eval()
    model.log = lambda *args, **kwargs: None
    sequences = [[3, 7, 1, 12, 5], [2, 4, 9]]
    shifted = batch_of([s[:-1] for s in sequences])
    targets, _ = left_pad([torch.tensor(s[1:]).numpy() for s in sequences], 8)
    shifted["targets"] = targets.masked_fill(~shifted["mask"], -100)
    prefixes = [(s[:t], s[t]) for s in sequences for t in range(1, len(s))]
    per_prefix = batch_of([h for h, _ in prefixes])
    per_prefix["target"] = torch.tensor([target for _, target in prefixes])
    with torch.no_grad():
        assert torch.allclose(model.training_step(shifted, 0), model.training_step(per_prefix, 0), atol=1e-5)


def test_fusion_scores_items_never_seen_in_training_by_their_content() -> None:
    """A new item's head row is untrained: its weight goes to the content scorers, unless it has no content
    at all (then the head is all that is left)."""
    counts = torch.tensor([0, 0, 3])
    text_present = torch.tensor([True, False, True])
    fusion = FrequencyAwareFusion(hidden=8, item_counts=counts, tables={"text": torch.randn(3, 4)}, present={"text": text_present})
    weights = fusion.weights()
    assert torch.equal(weights[0], torch.tensor([0.0, 1.0]))  # new, with text: text only
    assert torch.equal(weights[1], torch.tensor([1.0, 0.0]))  # new, no content: the head, not NaN
    assert torch.allclose(weights[2], torch.tensor([0.5, 0.5]))


def test_fusion_weights_follow_frequency_and_mask_absent_modalities() -> None:
    counts = torch.tensor([1, 1, 5, 50, 500])
    text_present = torch.tensor([True, False, True, True, True])
    fusion = FrequencyAwareFusion(
        hidden=8, item_counts=counts, tables={"collab": torch.randn(5, 3), "text": torch.randn(5, 4)},
        present={"collab": torch.ones(5, dtype=torch.bool), "text": text_present},
    )
    assert fusion.scorers == ["head", "collab", "text"]
    uniform = fusion.weights()
    assert torch.allclose(uniform[0], torch.full((3,), 1 / 3)) and torch.allclose(uniform[1], torch.tensor([0.5, 0.5, 0.0]))
    torch.manual_seed(0)
    for parameter in fusion.weight_mlp.parameters():
        torch.nn.init.normal_(parameter)
    weights = fusion.weights()
    assert torch.allclose(weights.sum(dim=1), torch.ones(5))
    assert weights[1, 2] == 0  # item 1 has no text: the text scorer gets no weight
    assert torch.allclose(weights[0], fusion.weights()[0]) and not torch.allclose(weights[0], weights[4])
    hidden = torch.randn(2, 8)
    logits = fusion(hidden)
    scores = fusion.scores(hidden)
    assert torch.allclose(logits[:, 1], weights[1, 0] * scores[0, :, 1] + weights[1, 1] * scores[1, :, 1], atol=1e-6)


def test_code_embeddings_start_from_the_codebooks_unless_random(sid_run: Path) -> None:
    codebook = tiny_model(sid_run, modalities=["text"], code_init="codebook")
    random = tiny_model(sid_run, modalities=["text"], code_init="random")
    _, codes, books = load_sids(sid_run, "text")
    items = torch.arange(1, 40)  # item 0 has no text, hence no text SID
    expected = sum(books[level][codes[items, level]] for level in range(len(books)))
    assert torch.allclose(codebook.item_encoder.sid_embeddings["text"](items), expected, atol=1e-6)
    assert not torch.allclose(random.item_encoder.sid_embeddings["text"](items), expected, atol=1e-2)
    assert not torch.allclose(codebook.item_encoder(items), random.item_encoder(items))
    assert torch.equal(codebook.item_encoder.sid_embeddings["text"](torch.tensor([0])), torch.zeros(1, 8))


def test_only_the_adapter_and_heads_are_exported_and_reload_to_identical_scores(sid_run: Path, tmp_path: Path) -> None:
    model = tiny_model(sid_run)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.eval()
    batch = batch_of([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]])
    expected = model.score_batch(batch)
    files = save_llm_export(model, tmp_path)
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)
    heads = load_file(str(tmp_path / "heads.safetensors"))
    assert all(key.startswith(("item_encoder.", "fusion.")) for key in heads)
    assert not any("table_" in key for key in heads)  # frozen embedding tables are read from the run
    assert {path.name for path in files.values()} == {"adapter", "heads.safetensors", "recommender.json", "backbone"}

    fresh = tiny_model(sid_run, seed=1).eval()
    assert not torch.allclose(fresh.score_batch(batch), expected)
    load_llm_export(fresh, tmp_path)
    assert torch.allclose(fresh.score_batch(batch), expected, atol=1e-6)


def test_checkpoints_keep_only_trained_tensors(sid_run: Path) -> None:
    model = tiny_model(sid_run)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    kept = set(checkpoint["state_dict"])
    assert kept == model.trainable_names()
    assert not any("base_layer" in key or "embed_tokens" in key for key in kept)
    assert any("lora_A" in key for key in kept) and any(key.startswith("fusion.head") for key in kept)
