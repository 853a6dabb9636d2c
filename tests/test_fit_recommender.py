"""``mmrec fit-recommender`` then ``mmrec test --model fusion``, end to end through ``mmrec.cli.main`` on the
tiny backbone; lineage checks; resuming; and (fixed seed) beating popularity on category-structured data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.artifacts import Manifest
from mmrec.cli import main as mmrec
from mmrec.errors import LineageError
from mmrec.evaluation.llm_loaders import load_fusion as load
from tests.fixtures import make_prepared_run, write_modality
from tests.llm_helpers import reference_ndcg, tiny_model, write_sids

pytestmark = pytest.mark.usefixtures("single_thread")
CONF = Path(__file__).parent / "conf"


def fit(run: Path, *extra: str) -> int:
    return mmrec(["fit-recommender", "--config", str(CONF / "fit-recommender.yaml"), "--run_dir", str(run), *extra])


def evaluate(run: Path, model: str) -> dict:
    assert mmrec(["test", "--config", str(CONF / "test.yaml"), "--run_dir", str(run), "--model", model]) == 0
    return json.loads((run / "test" / f"{model}-test" / "metrics.json").read_text())


def test_fit_then_test_exports_adapter_and_heads_and_evaluates(tiny_run: Path) -> None:
    write_sids(tiny_run)
    assert fit(tiny_run) == 0
    out = tiny_run / "fit-recommender"
    manifest = Manifest.read(out)
    assert {"adapter", "heads.safetensors", "recommender.json", "backbone"} <= {p.name for p in out.iterdir()}
    assert {"emb_collab", "emb_text", "sids", "codebooks", "interactions"} <= set(manifest.inputs)
    assert manifest.lineage["items"] == Manifest.read(tiny_run / "prepare").lineage["items"]
    assert manifest.extra["global_steps"] == 4 and manifest.extra["train_tokens"] > 0
    assert {"recall@10", "ndcg@10"} <= set(manifest.extra["best_val"])
    assert manifest.outputs["adapter"]["file"] == "adapter"

    last = tiny_run / "fit-recommender.work" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any("base_layer" in key or "embed_tokens" in key for key in state)

    metrics = evaluate(tiny_run, "fusion")
    assert metrics["metrics"]["ndcg@10"] == pytest.approx(reference_ndcg(tiny_run, "fusion"), abs=1e-9)

    exported, checkpointed = load(tiny_run, None, torch.device("cpu")), load(tiny_run, str(last), torch.device("cpu"))
    batch = {"history": torch.tensor([[1, 2, 3, 4]]), "mask": torch.ones(1, 4, dtype=torch.bool)}
    assert torch.allclose(exported.score_batch(batch), checkpointed.score_batch(batch), atol=1e-6)

    assert fit(tiny_run, "--resume", "true", "--trainer.max_steps", "6") == 0
    assert Manifest.read(out).extra["resumed_from"] == str(last)
    assert Manifest.read(out).extra["global_steps"] == 6

    (out / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(LineageError, match="adapter"):
        load(tiny_run, None, torch.device("cpu"))
    write_modality(tiny_run, "fit-collab", "collab", np.ones((40, 8), dtype=np.float32))
    with pytest.raises(LineageError, match="emb_collab.parquet"):
        load(tiny_run, None, torch.device("cpu"))


def test_item_readout_trains_on_shifted_sequences_and_answer_readout_refuses_them(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_sids(tiny_run)
    assert fit(tiny_run, "--data.train_mode", "shifted", "--model.init_args.readout", "item") == 0
    manifest = Manifest.read(tiny_run / "fit-recommender")
    assert manifest.extra["global_steps"] == 4 and json.loads((tiny_run / "fit-recommender" / "recommender.json").read_text())["hparams"]["readout"] == "item"
    assert evaluate(tiny_run, "fusion")["metrics"]["ndcg@10"] == pytest.approx(reference_ndcg(tiny_run, "fusion"), abs=1e-9)
    capsys.readouterr()
    assert fit(tiny_run, "--data.train_mode", "shifted") == 2
    assert "data.train_mode=shifted" in capsys.readouterr().err
    assert Manifest.read(tiny_run / "fit-recommender").extra["global_steps"] == 4  # the previous export stands


def test_sids_of_another_items_table_are_refused_naming_both_files(tiny_run: Path) -> None:
    folder = write_sids(tiny_run)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["lineage"]["items"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LineageError, match=r"assign-sids/manifest.json.*prepare/manifest.json"):
        tiny_model(tiny_run)


def test_tiny_backbone_beats_popularity_on_category_structured_data(tmp_path: Path) -> None:
    run = make_prepared_run(tmp_path / "run", num_users=300, num_items=40, seq_len=(6, 12), seed=3)
    write_modality(run, "fit-collab", "collab", np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32))
    write_sids(run, modalities=["text"])
    assert fit(
        run, "--model.modalities", "[text]", "--trainer.max_steps", "-1", "--trainer.max_epochs", "2",
        "--data.batch_size", "64", "--model.lr", "3e-3", "--model.warmup_ratio", "0.0",
    ) == 0
    fusion, popularity = evaluate(run, "fusion")["metrics"], evaluate(run, "popularity")["metrics"]
    assert fusion["ndcg@10"] > popularity["ndcg@10"] + 0.02, (fusion, popularity)
    assert fusion["recall@10"] > popularity["recall@10"]


@pytest.mark.parametrize(
    "configs",
    [["configs/demo/fit-recommender.yaml"], ["configs/beauty/fit-recommender.yaml"],
     ["configs/beauty/fit-recommender.yaml", "configs/beauty/fit-recommender-codebook-init.yaml"],
     ["configs/demo/fit-recommender-generative.yaml"], ["configs/beauty/fit-recommender-generative.yaml"]],
)
def test_shipped_configs_parse(configs: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).parent.parent
    args = [part for config in configs for part in ("--config", str(root / config))]
    assert mmrec(["fit-recommender", *args, "--print_config"]) == 0
    printed = capsys.readouterr().out
    # Beauty's fusion head chose random code embeddings on validation; the layer restores MME-SID's codebooks
    beauty_fusion = configs[0] == "configs/beauty/fit-recommender.yaml" and len(configs) == 1
    assert "code_init: " + ("random" if beauty_fusion else "codebook") in printed
    # the demo reads the state at each item and trains every prefix in one pass; the others one prompt per prefix
    shifted = configs == ["configs/demo/fit-recommender.yaml"]
    assert ("readout: item" in printed) == shifted and f"train_mode: {'shifted' if shifted else 'prefix'}" in printed
    head = "GenerativeRecommender" if "generative" in configs[0] else "LLMRecommender"
    assert f"class_path: mmrec.models.llm.{'generative' if 'generative' in configs[0] else 'recommender'}.{head}" in printed
