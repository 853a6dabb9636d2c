"""The LLM heads on GPUs: FSDP and DDP over NCCL on two, where the default suite cannot go.

Lightning runs FSDP on CUDA devices only, so on a CPU the suite tests just its refusals (``test_ddp.py``).
These tests are left out of ``make test``; ``make test-gpu`` runs them. On two CUDA devices, for each
head (fusion, generative) and each way of fine-tuning the backbone (full, LoRA), a run under
``configs/strategies/fit-recommender-fsdp.yaml`` on 2 GPUs publishes what a one-GPU run publishes, and
``mmrec test`` evaluates it; the fusion head under plain DDP over NCCL does the same. Checkpoint copies of
GPU tensors go to page-locked host buffers, which only a CUDA device has (one is enough).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmrec.cli import main as mmrec
from mmrec.stages.host_staging import HostStaging
from tests.llm_helpers import write_sids
from tests.test_ddp import (
    CONF,
    FINETUNE,
    FSDP,
    LLM_HEADS,
    VALIDATE,
    assert_publishes_the_same,
    assert_same_tensor_names,
    make_run,
    run_ddp,
)
from tests.test_resume_kill import evaluate

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def fit_on_gpus(run: Path, head: str, devices: int, *args: str) -> None:
    write_sids(run, suffix=True)  # unique SIDs, which the generative head needs
    run_ddp("fit-recommender", run, "--config", str(CONF / LLM_HEADS[head][0]), "--trainer.accelerator", "gpu",
            "--trainer.devices", str(devices), *VALIDATE, *args)


@two_gpus
@pytest.mark.parametrize("finetune", list(FINETUNE))
@pytest.mark.parametrize("head", list(LLM_HEADS))
def test_fsdp_on_two_gpus_publishes_what_one_gpu_publishes(head: str, finetune: str, tmp_path: Path) -> None:
    single, sharded = make_run(tmp_path / "single"), make_run(tmp_path / "fsdp")
    fit_on_gpus(single, head, 1, *FINETUNE[finetune])
    fit_on_gpus(sharded, head, 2, *FSDP, *FINETUNE[finetune])
    folder = LLM_HEADS[head][1]
    assert_publishes_the_same(single / folder, sharded / folder)
    assert_same_tensor_names(single / folder, sharded / folder)
    metrics = evaluate(sharded, head)
    assert 0 <= metrics["ndcg@10"] <= 1 and 0 <= metrics["recall@10"] <= 1


@two_gpus
def test_ddp_over_nccl_publishes_what_one_gpu_publishes(tmp_path: Path) -> None:
    single, ddp = make_run(tmp_path / "single"), make_run(tmp_path / "ddp")
    fit_on_gpus(single, "fusion", 1)
    fit_on_gpus(ddp, "fusion", 2, "--trainer.strategy", "ddp")
    assert_publishes_the_same(single / "fit-recommender", ddp / "fit-recommender")
    metrics = evaluate(ddp, "fusion")
    assert 0 <= metrics["ndcg@10"] <= 1 and 0 <= metrics["recall@10"] <= 1


@two_gpus
def test_lightnings_own_fsdp_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Lightning's FSDPStrategy cannot validate after fit (see mmrec.stages.fsdp): refused before any work."""
    run = make_run(tmp_path / "run")
    write_sids(run, suffix=True)
    args = ["fit-recommender", "--run_dir", str(run), "--config", str(CONF / LLM_HEADS["fusion"][0]), "--trainer.accelerator", "gpu",
            "--trainer.devices", "2", "--trainer.strategy", "fsdp"]
    assert mmrec(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "lightning.pytorch.strategies.fsdp.FSDPStrategy is not supported" in lines[0], lines
    assert not (run / "fit-recommender").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpoint_copies_of_gpu_tensors_go_to_reused_page_locked_buffers() -> None:
    staging = HostStaging(sets=1)
    weights = torch.arange(6.0, device="cuda")
    staged, buffers = staging.stage({"w": weights})
    assert staged["w"].is_pinned() and staged["w"].tolist() == list(range(6))
    staging.release(buffers)
    weights += 1
    again, _ = staging.stage({"w": weights})
    assert again["w"].data_ptr() == staged["w"].data_ptr() and again["w"].tolist() == list(range(1, 7))
