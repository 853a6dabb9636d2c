"""Distillation from SASRec into the fusion head (``model.distill_weight``): the loss against a hand computation
in both training modes, the teacher frozen and never saved, and the stage end to end, where ``mmrec test``
runs without the teacher."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmrec.artifacts import Manifest, stage_output
from mmrec.artifacts.exports import save_llm_export, save_sasrec
from mmrec.artifacts.manifest import file_sha256
from mmrec.cli import main as mmrec
from mmrec.data.datamodules import left_pad
from mmrec.data.prepared import PreparedData
from mmrec.data.recommender_inputs import RecommenderInputs
from mmrec.errors import InputError
from mmrec.evaluation.llm_loaders import load_fusion
from mmrec.models.llm.recommender import LLMRecommender
from mmrec.models.sasrec import SASRec
from tests.llm_helpers import SHORT_PROMPT, loaded, reference_ndcg, run_inputs, write_sids

pytestmark = pytest.mark.usefixtures("single_thread")
CONF = Path(__file__).parent / "conf"
ROOT = Path(__file__).parent.parent
MAX_LEN = 8
OPTIONS: dict[str, Any] = {"max_len": MAX_LEN, "prompt": SHORT_PROMPT, "proj_dim": 16, "encoder_hidden": 32, "dropout": 0.0}


def write_teacher(run_dir: Path) -> None:
    """Publish ``fit-collab`` as the stage does (SASRec weights, its config, its ``emb_collab``), from a random
    SASRec whose item table is wide enough for sharp, far from uniform scores; its ``max_len`` (12) is longer
    than the recommender's (8), so only the recommender's truncation keeps the two reading the same items."""
    prepared = PreparedData(run_dir)
    torch.manual_seed(0)
    sasrec = SASRec(num_items=prepared.num_items, hidden_size=8, num_blocks=1, num_heads=2, max_len=12)
    torch.nn.init.normal_(sasrec.item_embedding.weight, std=1.0)
    manifest = Manifest(stage="fit-collab", config={"source": "tests.test_distill"}, lineage=dict(prepared.manifest.lineage))
    with stage_output(run_dir, "fit-collab", manifest) as out:
        for name, path in save_sasrec(sasrec, out, prepared.train_item_counts > 0).items():
            manifest.add_output(name, path)


@pytest.fixture
def distill_run(tiny_run: Path) -> Path:
    write_teacher(tiny_run)
    write_sids(tiny_run)
    return tiny_run


def build(inputs: RecommenderInputs, **overrides: Any) -> LLMRecommender:
    """A small fusion model on the tiny backbone (seeded), in eval mode so that two forwards agree."""
    torch.manual_seed(0)
    return LLMRecommender(inputs, **loaded({**OPTIONS, **overrides})).eval()


def batch_of(histories: list[list[int]], targets: list[int] | None = None, width: int = MAX_LEN) -> dict[str, torch.Tensor]:
    """Left-padded histories as the data module collates them, cut to their last ``width`` items."""
    items, mask = left_pad([torch.tensor(h).numpy() for h in histories], width)
    batch = {"user_idx": torch.arange(len(histories)), "history": items, "mask": mask}
    if targets is not None:
        batch["target"] = torch.tensor(targets)
    return batch


def shifted_batch(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """One row per sequence with the next item at every position, -100 on padding (as the data module collates)."""
    batch = batch_of([s[:-1] for s in sequences])
    targets, _ = left_pad([torch.tensor(s[1:]).numpy() for s in sequences], MAX_LEN)
    batch["targets"] = targets.masked_fill(~batch["mask"], -100)
    return batch


def logged(model: LLMRecommender) -> dict[str, torch.Tensor]:
    """What ``training_step`` logs, by name (instead of Lightning's logger)."""
    values: dict[str, torch.Tensor] = {}
    model.log = lambda name, value, **kwargs: values.__setitem__(name, value.detach())
    return values


def by_hand(model: LLMRecommender, sasrec: SASRec, prefixes: list[tuple[list[int], int]], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and ``T^2 * KL(teacher || student)``, each averaged over ``prefixes`` (history, next item), every
    prefix scored alone: the student as its own prompt, the teacher by ``mmrec test``'s SASRec protocol."""
    ce, kl = [], []
    with torch.no_grad():
        for history, target in prefixes:
            batch = batch_of([history])
            student = model.fusion(model(batch["history"], batch["mask"]))[0]
            teacher = sasrec.score_batch(batch)[0]
            p, log_p = (teacher / temperature).softmax(-1), (teacher / temperature).log_softmax(-1)
            log_q = (student / temperature).log_softmax(-1)
            ce.append(F.cross_entropy(student, torch.tensor(target)))
            kl.append((p * (log_p - log_q)).sum())
    return torch.stack(ce).mean(), temperature**2 * torch.stack(kl).mean()


# ---- (a) weight 0: no teacher, the old loss ---------------------------------------------------------------

def test_weight_zero_builds_no_teacher_and_keeps_the_plain_cross_entropy(distill_run: Path) -> None:
    assert not LLMRecommender.input_needs({}).teacher and not LLMRecommender.input_needs({"distill_weight": 0.0}).teacher
    assert run_inputs(distill_run, LLMRecommender).teacher is None
    with_teacher = run_inputs(distill_run, LLMRecommender, distill_weight=0.5)
    assert isinstance(with_teacher.teacher, SASRec)

    for inputs in (run_inputs(distill_run, LLMRecommender, readout="item"), with_teacher):
        model = build(inputs, readout="item")
        assert model.teacher is None and not any(name.startswith("teacher.") for name in model.state_dict())
        logs = logged(model)
        prefix = batch_of([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]], targets=[4, 13])
        shifted = shifted_batch([[3, 7, 1, 12, 5], [2, 4, 9]])
        with torch.no_grad():
            expected_prefix = F.cross_entropy(model.fusion(model(prefix["history"], prefix["mask"])), prefix["target"])
            states = model.item_states(shifted["history"], shifted["mask"]).flatten(0, 1)
            expected_shifted = F.cross_entropy(model.fusion(states), shifted["targets"].flatten(), ignore_index=-100)
            assert torch.equal(model.training_step(prefix, 0), expected_prefix)
            assert torch.equal(model.training_step(shifted, 0), expected_shifted)
        assert set(logs) == {"train/loss"}


# ---- (b) weight > 0: the formula, computed by hand -------------------------------------------------------

@pytest.mark.parametrize("mode", ["prefix", "shifted"])
def test_the_loss_is_the_distillation_formula_over_every_real_prefix(distill_run: Path, mode: str) -> None:
    weight, temperature = 0.3, 2.0
    inputs = run_inputs(distill_run, LLMRecommender, distill_weight=weight)
    model = build(inputs, readout="item" if mode == "shifted" else "answer", distill_weight=weight, distill_temperature=temperature)
    logs = logged(model)
    if mode == "prefix":  # the first history is longer than max_len: student and teacher both read its last 8 items
        histories, targets = [[3, 7, 1, 12, 5, 9, 20, 2, 30, 11], [2, 4], [6]], [8, 9, 10]
        batch, prefixes = batch_of(histories, targets, width=2 * MAX_LEN), list(zip(histories, targets))
    else:  # the second row is padded: its padded positions must count in neither term
        sequences = [[3, 7, 1, 12, 5, 9, 20, 2, 30], [2, 4, 9]]
        batch = shifted_batch(sequences)
        prefixes = [(s[:t], s[t]) for s in sequences for t in range(1, len(s))]
    ce, distill = by_hand(model, inputs.teacher, prefixes, temperature)
    with torch.no_grad():
        loss = model.training_step(batch, 0)
    assert distill > 0.1  # a teacher far from the student: the KL term is no rounding error
    assert torch.allclose(logs["train/ce"], ce, atol=1e-5) and torch.allclose(logs["train/distill"], distill, atol=1e-5)
    assert torch.allclose(loss, (1 - weight) * ce + weight * distill, atol=1e-5)


# ---- (c) the teacher is frozen, never trained, never saved ------------------------------------------------

def test_the_teacher_is_frozen_and_stays_out_of_optimiser_checkpoints_and_export(distill_run: Path, tmp_path: Path) -> None:
    inputs = run_inputs(distill_run, LLMRecommender, distill_weight=0.5)
    inputs.teacher.requires_grad_(True).train()  # as a SASRec built in Python comes: the model must freeze it
    model = LLMRecommender(inputs, **loaded({**OPTIONS, "distill_weight": 0.5}))
    assert not any(module.training for module in model.teacher.modules())
    model.train()
    assert model.item_encoder.training and not any(module.training for module in model.teacher.modules())
    teacher = dict(model.teacher.named_parameters())
    logged(model)
    assert "teacher.sasrec.item_embedding.weight" in dict(model.named_parameters())  # registered: moves with the model

    loss = model.training_step(batch_of([[1, 2, 3], [4, 5, 6, 7]], targets=[4, 8]), 0)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in teacher.values())
    assert model.fusion.head.weight.grad is not None

    model._trainer = SimpleNamespace(estimated_stepping_batches=10)  # all configure_optimizers reads of the trainer
    optimised = {id(p) for group in model.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    assert not optimised & {id(p) for p in teacher.values()}
    assert not any(name.startswith("teacher.") for name in model.trainable_names())

    checkpoint = {"state_dict": model.state_dict()}
    assert any(key.startswith("teacher.") for key in checkpoint["state_dict"])
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(key.startswith("teacher.") for key in checkpoint["state_dict"])

    save_llm_export(model, tmp_path)
    heads = load_file(str(tmp_path / "heads.safetensors"))
    assert heads and not any(key.startswith("teacher.") for key in heads)
    hparams = json.loads((tmp_path / "recommender.json").read_text())["hparams"]
    assert (hparams["distill_weight"], hparams["distill_temperature"]) == (0.5, 1.0)
    assert json.loads((tmp_path / "recommender.json").read_text())["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_a_teacher_of_another_catalog_is_refused(distill_run: Path) -> None:
    inputs = run_inputs(distill_run, LLMRecommender, distill_weight=0.5)
    inputs.teacher = SASRec(num_items=inputs.num_items + 1, hidden_size=8, num_blocks=1, num_heads=2)
    with pytest.raises(InputError, match="teacher SASRec scores 41 items, but the catalog has 40"):
        build(inputs, distill_weight=0.5)


# ---- (d) the stage, end to end ----------------------------------------------------------------------------

def fit(run: Path, *extra: str) -> int:
    return mmrec(["fit-recommender", "--config", str(CONF / "fit-recommender.yaml"), "--run_dir", str(run), *extra])


def test_fit_recommender_distils_the_runs_sasrec_and_test_reads_no_teacher(tiny_run: Path) -> None:
    assert mmrec(["fit-collab", "--config", str(CONF / "fit-collab.yaml"), "--run_dir", str(tiny_run)]) == 0
    write_sids(tiny_run)
    assert fit(tiny_run, "--model.distill_weight", "0.5", "--model.distill_temperature", "2.0") == 0
    out = tiny_run / "fit-recommender"
    manifest, collab = Manifest.read(out), Manifest.read(tiny_run / "fit-collab")
    assert manifest.inputs["teacher"]["sha256"] == collab.outputs["sasrec"]["sha256"]
    assert manifest.inputs["teacher"]["path"] == str((tiny_run / "fit-collab" / "sasrec.safetensors").resolve())
    assert manifest.lineage == Manifest.read(tiny_run / "prepare").lineage
    spec = json.loads((out / "recommender.json").read_text())
    assert (spec["hparams"]["distill_weight"], spec["hparams"]["distill_temperature"]) == (0.5, 2.0)
    assert not any(key.startswith("teacher.") for key in load_file(str(out / "heads.safetensors")))
    last = tiny_run / "fit-recommender.work" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any(key.startswith("teacher.") for key in state)

    (tiny_run / "fit-collab" / "sasrec.safetensors").unlink()  # mmrec test must not need it
    assert mmrec(["test", "--config", str(CONF / "test.yaml"), "--run_dir", str(tiny_run), "--model", "fusion"]) == 0
    metrics = json.loads((tiny_run / "test" / "fusion-test" / "metrics.json").read_text())["metrics"]
    assert metrics["ndcg@10"] == pytest.approx(reference_ndcg(tiny_run, "fusion"), abs=1e-9)

    # an export written before the options existed (no distill_* keys) loads, as a model without distillation
    batch = batch_of([[1, 2, 3, 4]])
    expected = load_fusion(tiny_run, None, torch.device("cpu")).score_batch(batch)
    for key in ("distill_weight", "distill_temperature"):
        del spec["hparams"][key]
    (out / "recommender.json").write_text(json.dumps(spec))
    manifest.outputs["recommender"]["sha256"] = file_sha256(out / "recommender.json")
    manifest.write(out)
    old = load_fusion(tiny_run, None, torch.device("cpu"))
    assert old.hparams.distill_weight == 0.0 and old.teacher is None
    assert torch.allclose(old.score_batch(batch), expected, atol=1e-6)


# ---- (e) bad values and a missing teacher ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("options", "message"),
    [(["--model.distill_weight", "1.0"], "model.distill_weight must be in [0, 1)"),
     (["--model.distill_weight", "-0.1"], "model.distill_weight must be in [0, 1)"),
     (["--model.distill_temperature", "0"], "model.distill_temperature must be a positive number"),
     (["--model.distill_weight", "0.5"], "fit-collab: no exported SASRec to distil from (model.distill_weight > 0)")],
    ids=["weight 1", "negative weight", "temperature 0", "no SASRec in fit-collab"],
)
def test_bad_options_and_a_missing_teacher_stop_the_stage_with_one_line(
    tiny_run: Path, options: list[str], message: str, capsys: pytest.CaptureFixture[str],
) -> None:
    write_sids(tiny_run)  # tiny_run's fit-collab/ holds emb_collab only, no SASRec
    capsys.readouterr()
    assert fit(tiny_run, *options) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mmrec fit-recommender: error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tiny_run / "fit-recommender").exists()
    assert not list((tiny_run / "fit-recommender.work").rglob("*.ckpt"))


def test_the_beauty_config_distils_and_the_ablation_config_turns_it_off(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["fit-recommender", "--config", str(ROOT / "configs/beauty/fit-recommender.yaml")]
    assert mmrec([*base, "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "distill_weight: 0.5" in printed and "distill_temperature: 1.0" in printed
    assert mmrec([*base, "--config", str(ROOT / "configs/beauty/fit-recommender-no-distill.yaml"), "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "distill_weight: 0.0" in printed and "name_or_path: smollm2" in printed
