"""The generative SID head on the tiny backbone: SID tokens in the vocabulary and where their embeddings
start, trie-constrained beam search (only real items; exhaustive beams reproduce exact scoring), batch
independence, and ``fit-recommender`` / ``mmrec test --model generative`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.artifacts import Manifest
from mmrec.artifacts.exports import load_llm_checkpoint
from mmrec.cli import main as mmrec
from mmrec.data.prepared import load_sids
from mmrec.errors import InputError, MMRecError
from mmrec.evaluation.llm_loaders import load_generative as load
from mmrec.models.llm.backbone import BackboneSpec, load_backbone
from mmrec.models.llm.generative import GenerativeRecommender
from mmrec.models.llm.lora import LoRASpec
from mmrec.models.llm.prompt import PromptSpec
from mmrec.models.llm.sid_tokens import token_string
from mmrec.models.llm.sid_trie import SIDTrie, constrained_beam_search
from tests.llm_helpers import reference_ndcg, run_inputs, tiny_generative, write_sids
from tests.test_llm_model import batch_of

pytestmark = pytest.mark.usefixtures("single_thread")
CONF = Path(__file__).parent / "conf"
NUM_ITEMS = 40


@pytest.fixture
def sid_run(tiny_run: Path) -> Path:
    write_sids(tiny_run, suffix=True)
    return tiny_run


generative = tiny_generative


def exact_scores(model: GenerativeRecommender, history: list[int]) -> torch.Tensor:
    """Teacher-forced log-probability of every item's SID after ``history`` (-inf: no SID)."""
    items = torch.arange(NUM_ITEMS)
    with_sid = (model.item_codes >= 0).all(dim=1)
    hist = torch.tensor(history).expand(NUM_ITEMS, -1)
    with torch.no_grad():
        scores = model.sid_logprobs(hist, torch.ones_like(hist, dtype=torch.bool), items.clamp(min=0)).sum(dim=1)
    return scores.masked_fill(~with_sid, -torch.inf)


def test_sid_tokens_join_the_vocabulary_and_prompts_read_as_sid_strings(sid_run: Path) -> None:
    model = generative(sid_run).eval()
    assert model.vocab.level_sizes[:2] == (6, 6) and len(model.vocab.level_sizes) == 3  # two levels + suffix
    first = int(model.sid_token_ids[0])
    assert model.tokenizer(token_string(0, 0), add_special_tokens=False)["input_ids"] == [first]
    assert model.lm.get_input_embeddings().weight.shape[0] >= first + model.vocab.num_tokens
    ids, _, lengths = model._sequences(torch.tensor([[3, 7]]), torch.ones(1, 2, dtype=torch.bool))
    text = model.tokenizer.decode(ids[0, : int(lengths[0])])
    codes = model.item_codes[3].tolist()
    assert "".join(token_string(level, code) for level, code in enumerate(codes)) in text
    assert model.tokenizer(text, add_special_tokens=False)["input_ids"] == ids[0, : int(lengths[0])].tolist()


def test_codebook_init_puts_each_sid_token_where_its_code_vector_is(sid_run: Path) -> None:
    model = generative(sid_run, code_init="codebook")
    _, _, codebooks = load_sids(sid_run, "collab")
    weight = model.lm.get_input_embeddings()(model.sid_token_ids).detach()
    books = torch.cat(codebooks)  # the two quantizer levels, level-major like the token block
    rows = weight[: len(books)]
    # One orthonormal map and one scale: every inner product between code vectors is kept, up to scale^2.
    gram, expected = rows @ rows.T, books @ books.T
    scale2 = float(gram.trace() / expected.trace())
    assert torch.allclose(gram, scale2 * expected, atol=1e-4 * float(gram.abs().max()))
    backbone_norm = model.lm.get_input_embeddings().weight[: int(model.sid_token_ids.min())].norm(dim=1).mean()
    assert torch.isclose(rows.norm(dim=1).mean(), backbone_norm, rtol=1e-4)

    random = generative(sid_run, code_init="random")
    rows_random = random.lm.get_input_embeddings()(random.sid_token_ids).detach()[: len(books)]
    assert not torch.allclose(rows_random @ rows_random.T, scale2 * expected, atol=1e-2)


def test_beam_search_returns_distinct_real_items_and_marks_empty_slots(tiny_run: Path) -> None:
    write_sids(tiny_run, modalities=("text",), suffix=True)  # the fixture has one item without text
    model = generative(tiny_run, sid_modality="text").eval()
    without_sid = set(torch.nonzero((model.item_codes < 0).any(dim=1)).flatten().tolist())
    assert without_sid
    history = torch.tensor([[1, 2, 3], [0, 5, 9], [4, 4, 4]])
    items, scores = model.decode(history, torch.ones_like(history, dtype=torch.bool), num_beams=60)
    for row, row_scores in zip(items.tolist(), scores):
        real = [item for item in row if item >= 0]
        assert len(real) == NUM_ITEMS - len(without_sid) and len(set(real)) == len(real)
        assert not set(real) & without_sid
        assert row[len(real):] == [-1] * (60 - len(real)) and bool(torch.isinf(row_scores[len(real):]).all())
        assert bool((row_scores[: len(real)].diff() <= 0).all())  # best first


def test_exhaustive_beam_search_top1_is_the_argmax_of_exact_scoring(sid_run: Path) -> None:
    model = generative(sid_run).eval()
    for history in ([1, 2, 3], [7], [10, 11, 12, 13, 14, 15]):
        exact = exact_scores(model, history)
        hist = torch.tensor([history])
        items, scores = model.decode(hist, torch.ones_like(hist, dtype=torch.bool), num_beams=NUM_ITEMS)
        assert int(items[0, 0]) == int(exact.argmax())
        assert torch.allclose(scores[0], exact[items[0]], atol=1e-4)  # every beam's score is its exact score
        assert items[0].tolist() == exact.argsort(descending=True, stable=True).tolist()


def test_renormalized_exhaustive_beams_are_a_distribution_over_the_catalog(sid_run: Path) -> None:
    """By the model's log-probability the catalog's SIDs hold less than all the mass (some goes to code tuples no
    item has); renormalized, exactly all of it."""
    model = generative(sid_run).eval()
    hist = torch.tensor([[1, 2, 3]])
    mask = torch.ones_like(hist, dtype=torch.bool)
    with torch.no_grad():
        _, joint = model.decode(hist, mask, num_beams=NUM_ITEMS)
        model.renormalize = True
        _, renormalized = model.decode(hist, mask, num_beams=NUM_ITEMS)
    assert float(joint.exp().sum()) < 0.99 and float(renormalized.exp().sum()) == pytest.approx(1.0, abs=1e-4)


def test_a_users_list_does_not_depend_on_padding_or_batch_composition(sid_run: Path) -> None:
    model = generative(sid_run).eval()
    alone_items, alone_scores = model.topk_batch(batch_of([[5, 9, 13]]), 10)
    mixed_items, mixed_scores = model.topk_batch(batch_of([[1, 2, 3, 4, 6, 7, 8, 10], [5, 9, 13], [0]]), 10)
    assert torch.equal(alone_items[0], mixed_items[1])
    assert torch.allclose(alone_scores[0], mixed_scores[1], atol=1e-5)


def test_titles_follow_each_history_items_sid(sid_run: Path) -> None:
    plain, titled = generative(sid_run), generative(sid_run, with_titles=True, title_tokens=5)
    assert titled.item_tokens.shape[1] == plain.item_tokens.shape[1] + 5
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert titled._sequences(torch.tensor([[3, 7]]), mask)[2] > plain._sequences(torch.tensor([[3, 7]]), mask)[2]


def test_shared_sids_are_refused_naming_the_file(tiny_run: Path) -> None:
    write_sids(tiny_run, codebook_size=3)  # 9 tuples for 40 items: collisions, no disambiguation level
    with pytest.raises(InputError, match=r"sids\.parquet: .* share an SID .*collisions suffix"):
        generative(tiny_run)


def test_a_live_beam_outside_the_catalog_raises_instead_of_returning_an_item() -> None:
    trie = SIDTrie(torch.tensor([[0, 1], [1, 0]]), (2, 2))
    with pytest.raises(MMRecError, match="no valid continuation"):
        trie.allowed(1, torch.tensor([[5]]), torch.tensor([[True]]))

    def uniform(depth: int, origin: torch.Tensor | None, codes: torch.Tensor | None) -> torch.Tensor:
        return torch.full((1, 1 if origin is None else origin.shape[1], 2), -np.log(2.0))

    items, scores = constrained_beam_search(uniform, trie, 1, 4, torch.device("cpu"))
    assert sorted(items[0, :2].tolist()) == [0, 1] and items[0, 2:].tolist() == [-1, -1]
    assert bool(torch.isinf(scores[0, 2:]).all()) and torch.allclose(scores[0, :2], torch.full((2,), -float(np.log(4.0))))


def test_renormalized_beams_score_each_sid_by_its_probability_among_the_catalogs_sids() -> None:
    """Items (0,0), (0,1) and (1,0); the model gives level 0 .6 / .4 and every level-1 code .5. By the model's
    log-probability (1,0) is last (.4 x .5 = .2 against .3); among the catalog's SIDs its level 1 is forced and
    costs nothing, so it comes first (.4 against .3), and the three scores are a distribution."""
    trie = SIDTrie(torch.tensor([[0, 0], [0, 1], [1, 0]]), (2, 2))

    def step(depth: int, origin: torch.Tensor | None, codes: torch.Tensor | None) -> torch.Tensor:
        beams = 1 if origin is None else origin.shape[1]
        probs = torch.tensor([0.6, 0.4]) if depth == 0 else torch.tensor([0.5, 0.5])
        return probs.log().expand(1, beams, 2)

    items, scores = constrained_beam_search(step, trie, 1, 3, torch.device("cpu"))
    assert items[0, 2] == 2 and torch.allclose(scores[0].exp(), torch.tensor([0.3, 0.3, 0.2]))
    items, scores = constrained_beam_search(step, trie, 1, 3, torch.device("cpu"), renormalize=True)
    assert items[0, 0] == 2 and torch.allclose(scores[0].exp(), torch.tensor([0.4, 0.3, 0.3]))
    assert torch.allclose(scores[0].exp().sum(), torch.tensor(1.0))
    items, scores = constrained_beam_search(step, trie, 1, 4, torch.device("cpu"), renormalize=True)
    assert items[0, 3] == -1 and bool(torch.isinf(scores[0, 3])) and not bool(torch.isnan(scores).any())


def fit(run: Path, *extra: str) -> int:
    return mmrec(["fit-recommender", "--config", str(CONF / "fit-recommender-generative.yaml"), "--run_dir", str(run), *extra])


def test_fit_then_test_generative_end_to_end(sid_run: Path) -> None:
    assert fit(sid_run) == 0
    out = sid_run / "fit-recommender-generative"  # beside the fusion head's fit-recommender/, not over it
    spec = json.loads((out / "recommender.json").read_text())
    assert spec["head"] == "generative" and spec["hparams"]["num_beams"] == 20
    manifest = Manifest.read(out)
    assert {"sids", "codebooks"} <= set(manifest.inputs) and manifest.extra["global_steps"] == 4
    last = sid_run / "fit-recommender-generative.work" / "checkpoints" / "last.ckpt"  # the fusion head's stay apart
    assert not (sid_run / "fit-recommender.work").exists()
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert any("trainable_tokens_delta" in key for key in state) and not any("base_layer" in key for key in state)

    assert mmrec(["test", "--config", str(CONF / "test.yaml"), "--run_dir", str(sid_run), "--model", "generative"]) == 0
    metrics = json.loads((sid_run / "test" / "generative-test" / "metrics.json").read_text())
    assert metrics["protocol"]["ranking"].startswith("model's top-k list") and metrics["protocol"]["num_beams"] == 20
    assert metrics["metrics"]["ndcg@10"] == pytest.approx(reference_ndcg(sid_run, "generative"), abs=1e-9)
    # a wider beam search at test time, beside the model's own figures
    assert mmrec(["test", "--config", str(CONF / "test.yaml"), "--run_dir", str(sid_run), "--model", "generative",
                  "--num_beams", "40"]) == 0
    wide = json.loads((sid_run / "test" / "generative-test-beams40" / "metrics.json").read_text())
    assert wide["protocol"]["num_beams"] == 40 and (sid_run / "test" / "generative-test" / "metrics.json").is_file()
    # scored among the catalog's SIDs instead, beside them too
    assert metrics["protocol"]["renormalize"] is False
    assert mmrec(["test", "--config", str(CONF / "test.yaml"), "--run_dir", str(sid_run), "--model", "generative",
                  "--renormalize", "true"]) == 0
    renormalized = json.loads((sid_run / "test" / "generative-test-renorm" / "metrics.json").read_text())
    assert renormalized["protocol"]["renormalize"] is True and 0 <= renormalized["metrics"]["ndcg@10"] <= 1

    exported, checkpointed = load(sid_run, None, torch.device("cpu")), load(sid_run, str(last), torch.device("cpu"))
    history = torch.tensor([[1, 2, 3, 4]])
    mask = torch.ones_like(history, dtype=torch.bool)
    assert torch.equal(exported.decode(history, mask, 10)[0], checkpointed.decode(history, mask, 10)[0])
    # ... and both are the model that trained: built as the stage built it (the random tiny backbone from its
    # seed), given the checkpoint's tensors. The export's saved backbone must carry every frozen tensor.
    hparams = dict(spec["hparams"])
    trained_model = GenerativeRecommender(
        run_inputs(sid_run, GenerativeRecommender, **hparams), backbone=load_backbone(BackboneSpec(**hparams.pop("backbone"))), lora=LoRASpec(**hparams.pop("lora")),
        prompt=PromptSpec(**hparams.pop("prompt")), **hparams,
    )
    load_llm_checkpoint(trained_model, last)
    trained_model.eval()
    items, scores = trained_model.decode(history, mask, 10)
    assert torch.equal(items, exported.decode(history, mask, 10)[0])
    assert torch.allclose(scores, checkpointed.decode(history, mask, 10)[1], atol=1e-5)
    trained = exported.lm.get_input_embeddings()(exported.sid_token_ids)
    initial = generative(sid_run).lm.get_input_embeddings()(exported.sid_token_ids)
    assert not torch.allclose(trained, initial)  # the SID rows were trained, and the export carries them

    assert mmrec(["test", "--config", str(CONF / "test.yaml"), "--run_dir", str(sid_run), "--model", "fusion"]) == 2


@pytest.mark.parametrize(("model", "option", "expected"), [
    ("popularity", ["--num_beams", "30"], "--num_beams: --model popularity does not decode by beam search"),
    ("popularity", ["--renormalize", "true"], "--renormalize: --model popularity does not decode by beam search"),
    ("generative", ["--num_beams", "0"], "--num_beams must be at least 1"),
])
def test_a_beam_search_option_that_cannot_apply_is_one_line(
    tiny_run: Path, model: str, option: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mmrec(["test", "--run_dir", str(tiny_run), "--model", model, "--device", "cpu", *option]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err
    assert not (tiny_run / "test").exists()

