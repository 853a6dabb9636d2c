"""The export written from a full state dict while the live parameters are shards of it, as under FSDP.

Lightning runs FSDP on GPUs only, and there the first runs showed what goes wrong when the export reads the
live modules: peft's ``save_pretrained`` picked no adapter tensor (its filter goes by live module names, which
FSDP's wrappers change), the ``tiny`` backbone was read from shards through a collective only rank 0 joined,
and ``recommender.json`` counted rank 0's share of the parameters. Here the live parameters are replaced by
1-D pieces of themselves after the full state dict is taken: the export must still reload to the same scores
and name its tensors exactly as peft names them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from mmrec.artifacts.exports import load_llm_export, save_llm_export
from mmrec.models.llm.base import LLMRecommenderBase
from tests.llm_helpers import tiny_generative, tiny_model, write_sids
from tests.test_llm_model import batch_of


@pytest.fixture
def sid_run(tiny_run: Path) -> Path:
    write_sids(tiny_run, suffix=True)  # unique SIDs, which the generative head needs
    return tiny_run


def trained_then_sharded(model: LLMRecommenderBase) -> dict[str, torch.Tensor]:
    """Perturb the trained tensors, take the full state dict, then leave every live parameter a 1-D shard."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    full = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for parameter in model.parameters():
        parameter.data = parameter.data.flatten()[: max(1, parameter.numel() // 2)].clone()
    return full


def test_the_adapter_is_named_as_peft_names_it(sid_run: Path) -> None:
    for model in (tiny_model(sid_run), tiny_generative(sid_run)):  # LoRA; LoRA and new token rows
        expected = get_peft_model_state_dict(model.lm)
        ours = model.adapter_state()
        assert set(ours) == set(expected) and ours
        assert all(torch.equal(ours[key], expected[key].cpu()) for key in expected)


def test_an_export_from_the_full_state_dict_ignores_the_shards(sid_run: Path, tmp_path: Path) -> None:
    model = tiny_model(sid_run).eval()
    batch = batch_of([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]])
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    reference = tiny_model(sid_run).eval()
    full = trained_then_sharded(model)
    reference.load_state_dict(full)
    expected = reference.score_batch(batch)

    save_llm_export(model, tmp_path, full)
    assert load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys() == reference.adapter_state().keys()
    assert model.spec(full)["trainable_parameters"] == count
    fresh = tiny_model(sid_run, seed=1).eval()
    load_llm_export(fresh, tmp_path)
    assert torch.allclose(fresh.score_batch(batch), expected, atol=1e-6)


def test_a_checkpoint_fsdp_has_already_loaded_is_not_checked_again(sid_run: Path) -> None:
    """Lightning's FSDP loads the state dict itself and removes it before the module's hook runs."""
    tiny_model(sid_run).on_load_checkpoint({"epoch": 1})
