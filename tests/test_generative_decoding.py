"""Tree-attention decoding of the generative head against exact scoring, on the tiny backbone with five SID
levels (as on Amazon-Beauty): every beam's score is its item's teacher-forced log-probability, exhaustive
beams are exact top-k, a user's list ignores the rest of the batch, the prompt's cache stays one row per user,
and eager attention (additive mask) agrees with sdpa (boolean mask)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmrec.models.llm.generative import GenerativeRecommender
from tests.llm_helpers import write_sids
from tests.test_generative import NUM_ITEMS, generative
from tests.test_llm_model import batch_of

pytestmark = pytest.mark.usefixtures("single_thread")
HISTORIES = [[1, 2, 3, 4, 6, 7, 8, 10], [5, 9, 13], [0], [11, 12, 14, 15, 16]]  # unequal lengths: right padding


@pytest.fixture
def deep_model(tiny_run: Path) -> GenerativeRecommender:
    """Four quantizer levels of three codes and a suffix level: five SID levels, prefixes shared by many items."""
    write_sids(tiny_run, levels=4, codebook_size=3, suffix=True)
    model = generative(tiny_run).eval()
    assert model.vocab.num_levels == 5
    return model


def exact_scores(model: GenerativeRecommender, history: list[int]) -> torch.Tensor:
    """``[N]`` teacher-forced log-probability of every item's SID after ``history`` (-inf: no SID)."""
    items = torch.arange(NUM_ITEMS)
    with_sid = (model.item_codes >= 0).all(dim=1)
    hist = torch.tensor(history).expand(NUM_ITEMS, -1)
    with torch.no_grad():
        scores = model.sid_logprobs(hist, torch.ones_like(hist, dtype=torch.bool), items).sum(dim=1)
    return scores.masked_fill(~with_sid, -torch.inf)


def decode(model: GenerativeRecommender, histories: list[list[int]], beams: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = batch_of(histories)
    with torch.no_grad():
        return model.decode(batch["history"], batch["mask"], beams)


def test_every_beams_score_is_its_items_teacher_forced_log_prob(deep_model: GenerativeRecommender) -> None:
    items, scores = decode(deep_model, HISTORIES, beams=7)  # fewer beams than items: a real, pruned search
    for user, history in enumerate(HISTORIES):
        exact = exact_scores(deep_model, history)
        assert (items[user] >= 0).all() and len(set(items[user].tolist())) == 7
        assert torch.allclose(scores[user], exact[items[user]], atol=1e-5)
        assert bool((scores[user].diff() <= 0).all())


def test_exhaustive_beams_are_the_exact_ranking_of_the_catalog(deep_model: GenerativeRecommender) -> None:
    items, scores = decode(deep_model, HISTORIES, beams=NUM_ITEMS + 3)
    for user, history in enumerate(HISTORIES):
        exact = exact_scores(deep_model, history)
        assert items[user, :NUM_ITEMS].tolist() == exact.argsort(descending=True, stable=True).tolist()
        assert torch.allclose(scores[user, :NUM_ITEMS], exact.sort(descending=True).values, atol=1e-5)
        assert items[user, NUM_ITEMS:].tolist() == [-1] * 3 and bool(torch.isneginf(scores[user, NUM_ITEMS:]).all())


def test_a_users_beams_do_not_depend_on_the_rest_of_the_batch(deep_model: GenerativeRecommender) -> None:
    together_items, together_scores = decode(deep_model, HISTORIES, beams=6)
    for user, history in enumerate(HISTORIES):
        alone_items, alone_scores = decode(deep_model, [history], beams=6)
        assert torch.equal(alone_items[0], together_items[user])
        assert torch.allclose(alone_scores[0], together_scores[user], atol=1e-5)
    reordered_items, _ = decode(deep_model, HISTORIES[::-1], beams=6)
    assert torch.equal(reordered_items.flip(0), together_items)


def test_the_prompt_cache_stays_one_row_per_user_and_grows_by_the_beams(deep_model: GenerativeRecommender) -> None:
    seen: list[tuple[tuple[int, ...], tuple[int, ...] | None]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        seen.append((tuple(kwargs["input_ids"].shape), None if mask is None else tuple(mask.shape)))

    handle = deep_model.decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        decode(deep_model, HISTORIES, beams=5)
    finally:
        handle.remove()
    (users, prompt), prompt_mask = seen[0]
    assert users == len(HISTORIES) and prompt_mask is None  # right padding: the causal kernel, no mask
    assert seen[1:] == [((users, 5), (users, 1, 5, prompt + 5 * depth)) for depth in range(1, 5)]


def test_eager_attention_decodes_as_sdpa_does(deep_model: GenerativeRecommender) -> None:
    sdpa_items, sdpa_scores = decode(deep_model, HISTORIES, beams=6)
    deep_model.base_model().set_attn_implementation("eager")
    eager_items, eager_scores = decode(deep_model, HISTORIES, beams=6)
    assert torch.equal(sdpa_items, eager_items) and torch.allclose(sdpa_scores, eager_scores, atol=1e-5)
