"""The LLM heads' speed paths compute what the plain paths compute: full fine-tuning trains and exports
every backbone weight and reloads as the model that trained; a compiled training forward gives the eager
loss; and a shape-only backbone (``configs/backbones/*.json``) builds the architecture it names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from mmrec.artifacts import Manifest
from mmrec.cli import main as mmrec
from mmrec.errors import InputError
from mmrec.evaluation.llm_loaders import load_fusion, load_generative
from mmrec.models.compiled import CompiledBlocks
from mmrec.models.llm.backbone import BackboneSpec, load_backbone
from tests.llm_helpers import tiny_model, write_sids

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).parent.parent
CONF = Path(__file__).parent / "conf"


@pytest.mark.parametrize("head", ["fusion", "generative"])
def test_full_finetuning_trains_every_backbone_weight_and_the_export_is_that_model(tiny_run: Path, head: str) -> None:
    write_sids(tiny_run, suffix=head == "generative")
    config = "fit-recommender-generative.yaml" if head == "generative" else "fit-recommender.yaml"
    assert mmrec(["fit-recommender", "--config", str(CONF / config), "--run_dir", str(tiny_run),
                  "--model.init_args.backbone.finetune", "full"]) == 0
    load = load_generative if head == "generative" else load_fusion
    out = tiny_run / ("fit-recommender-generative" if head == "generative" else "fit-recommender")
    assert "adapter" not in Manifest.read(out).outputs and not (out / "adapter").exists()

    heads = load_file(str(out / "heads.safetensors"))
    spec = json.loads((out / "recommender.json").read_text())
    backbone = {k: v for k, v in heads.items() if k.startswith("lm.")}
    fresh = load_backbone(BackboneSpec(**{**spec["hparams"]["backbone"], "name_or_path": "tiny"})).model
    layer = "model.layers.0.mlp.down_proj.weight"
    assert f"lm.{layer}" in backbone and not torch.allclose(backbone[f"lm.{layer}"], fresh.state_dict()[layer])

    last = tiny_run / f"{out.name}.work" / "checkpoints" / "last.ckpt"
    exported = load(tiny_run, None, torch.device("cpu"))
    checkpointed = load(tiny_run, str(last), torch.device("cpu"))
    batch = {"history": torch.tensor([[1, 2, 3, 4]]), "mask": torch.ones(1, 4, dtype=torch.bool)}
    if head == "fusion":
        assert torch.allclose(exported.score_batch(batch), checkpointed.score_batch(batch), atol=1e-6)
    else:
        assert torch.equal(exported.decode(batch["history"], batch["mask"], 10)[0],
                           checkpointed.decode(batch["history"], batch["mask"], 10)[0])
    assert mmrec(["test", "--config", str(CONF / "test.yaml"), "--run_dir", str(tiny_run), "--model", head]) == 0


def test_compiled_training_forward_gives_the_eager_loss_and_gradients(tiny_run: Path) -> None:
    write_sids(tiny_run)
    batch = {"history": torch.tensor([[0, 0, 3, 7, 1], [2, 9, 4, 4, 5]]),
             "mask": torch.tensor([[False, False, True, True, True], [True] * 5]), "target": torch.tensor([6, 11])}
    results = []
    for compiled in (False, True):
        model = tiny_model(tiny_run, backbone=BackboneSpec(compile=compiled, finetune="full"), dropout=0.0).train()
        model.log = lambda *args, **kwargs: None  # no trainer attached
        loss = model.training_step(batch, 0)
        loss.backward()
        layer = model.base_model().model.layers[0].self_attn.q_proj.weight
        results.append((loss.detach(), layer.grad.clone()))
        ran_compiled = model._compiled_layers is not None and model._compiled_layers.compiled
        assert ran_compiled == compiled  # compiled, and no fallback to the eager forward
    (eager, eager_grad), (fast, fast_grad) = results
    assert torch.allclose(eager, fast, atol=1e-5) and torch.allclose(eager_grad, fast_grad, atol=1e-5)


def test_compiled_layers_share_one_graph_across_layers_and_lengths() -> None:
    """Regional compilation: every decoder layer and every prompt length runs one compiled graph, so compile
    time is one layer's, once (a graph per layer or per length is what made the H200 run compile for minutes)."""
    model = load_backbone(BackboneSpec(finetune="full")).model.requires_grad_(True)
    decoder = model.get_decoder()
    blocks = CompiledBlocks(decoder.layers, "test")
    torch._dynamo.reset()
    counters.clear()
    for length in (6, 9, 13):
        ids = torch.randint(0, 200, (3, length))
        with blocks.active():
            hidden = decoder(input_ids=ids, position_ids=torch.arange(length).expand(3, -1), use_cache=False)
        hidden.last_hidden_state.sum().backward()
    assert counters["stats"]["unique_graphs"] == 1 and blocks.compiled
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in decoder.layers)  # the originals are back
    assert len(decoder.layers) >= 2


def test_shape_only_backbones_build_their_architecture() -> None:
    loaded = load_backbone(BackboneSpec(name_or_path=str(ROOT / "configs/backbones/smollm2-135m.json")))
    model, tokenizer = loaded.model, loaded.tokenizer
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6  # SmolLM2-135M
    assert tokenizer.chat_template and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(InputError, match="not found"):
        load_backbone(BackboneSpec(name_or_path="no/such/shape.json"))
