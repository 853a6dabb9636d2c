"""MMRQVAE: it learns, every branch and codebook gets gradient, each loss switch changes what is optimised,
absent modalities are masked out, inference is deterministic, and save/load round-trips."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.utils.data import DataLoader, Dataset

from mmrec.artifacts.exports import read_quantizer, save_quantizer
from mmrec.models.mm_rqvae import MMRQVAE
from mmrec.models.residual_quantizer import sinkhorn_codes

DIMS = {"collab": 8, "text": 16}


def synthetic_items(n: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """Items in 16 latent groups; collab and text are two noisy views of the same latent (item 0 lacks text)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(16, 4, generator=g)[torch.arange(n) % 16] + 0.3 * torch.randn(n, 4, generator=g)
    table = {"item_idx": torch.arange(n)}
    for m, dim in DIMS.items():
        table[m] = latent @ torch.randn(4, dim, generator=g) + 0.05 * torch.randn(n, dim, generator=g)
        table[f"{m}_present"] = torch.ones(n, dtype=torch.bool)
    table["text_present"][0] = False
    table["text"][0] = 0.0
    return table


class Items(Dataset):
    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table["item_idx"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.table.items()}


def tiny_model(**overrides: object) -> MMRQVAE:
    kwargs = {"input_dims": DIMS, "num_levels": 2, "codebook_size": 8, "code_dim": 8, "hidden_dims": [16], "kmeans_iters": 5,
              "sinkhorn_iters": 10, "reseed_pool_size": 256, "lr": 3e-3, "tau_pairs": 500}
    kwargs.update(overrides)
    return MMRQVAE(**kwargs)


def initialised(model: MMRQVAE, table: dict[str, torch.Tensor]) -> MMRQVAE:
    torch.manual_seed(0)
    model.initialise([table])
    return model


def test_tiny_quantizer_learns() -> None:
    """Trained through Lightning (k-means init in on_train_start, re-seeding every epoch): the loss falls by
    more than half and every level of both modalities ends with at least 7 of its 8 codes in use."""
    L.seed_everything(0, verbose=False)
    table = synthetic_items()
    model = tiny_model()
    trainer = L.Trainer(max_epochs=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    first = None

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            nonlocal first
            first = first if first is not None else float(trainer.callback_metrics["train/loss"])

    trainer.callbacks.append(Record())
    trainer.fit(model, DataLoader(Items(table), batch_size=64, shuffle=True))
    last = float(trainer.callback_metrics["train/loss"])
    assert last < 0.5 * first
    report = model.evaluate_codes([table], tau_pairs=2000)
    for m, metrics in report.items():
        assert min(metrics["utilisation"]) >= 7 / 8, (m, metrics)
    assert report["text"]["items"] == 255


def test_gradients_reach_every_branch_and_codebook() -> None:
    table = synthetic_items(64)
    model = initialised(tiny_model(num_levels=3), table)
    model.compute_losses(table)["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for m, branch in model.branches.items():
        per_level = branch.quantizer.codebook.grad.abs().sum((1, 2))
        assert (per_level > 0).all(), f"{m}: a level's codebook got no gradient"


def grads(model: MMRQVAE, table: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss = model.compute_losses(table)["loss"]
    if loss.requires_grad:
        loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def nonzero(gradients: dict[str, torch.Tensor], part: str) -> bool:
    return any(g.abs().sum() > 0 for n, g in gradients.items() if part in n)


@pytest.mark.parametrize(
    "switch, trained, untouched",
    [
        ({"recon_weight": 0.0, "align_weight": 0.0}, ["encoder", "codebook"], ["decoder"]),
        ({"codebook_weight": 0.0}, ["encoder", "decoder"], ["codebook"]),
        ({"recon_weight": 0.0, "codebook_weight": 0.0, "commitment_weight": 0.0},
         ["collab.encoder", "text.encoder"], ["decoder", "codebook"]),
        ({"recon_weight": 0.0, "codebook_weight": 0.0, "align_weight": 0.0}, ["encoder"], ["decoder", "codebook"]),
        ({"recon_weight": 0.0, "codebook_weight": 0.0, "commitment_weight": 0.0, "align_weight": 0.0},
         [], ["encoder", "decoder", "codebook"]),
    ],
    ids=["recon-off", "codebook-off", "align-only", "commitment-only", "all-off"],
)
def test_each_loss_switch_changes_what_is_optimised(switch: dict, trained: list[str], untouched: list[str]) -> None:
    table = synthetic_items(64)
    gradients = grads(initialised(tiny_model(**switch), table), table)
    for part in trained:
        assert nonzero(gradients, part), f"{switch}: {part} should be trained"
    for part in untouched:
        assert not nonzero(gradients, part), f"{switch}: {part} should get no gradient"


@pytest.mark.parametrize("switch", [{"recon_loss": "mse"}, {"align_weight": 0.0}, {"commitment_weight": 0.0}])
def test_switching_a_term_changes_the_encoder_gradient(switch: dict) -> None:
    table = synthetic_items(64)
    torch.manual_seed(0)
    base = initialised(tiny_model(), table)
    changed = tiny_model(**switch)
    changed.load_state_dict(base.state_dict())
    a, b = grads(base, table), grads(changed, table)
    assert not torch.allclose(a["branches.collab.encoder.0.weight"], b["branches.collab.encoder.0.weight"])


def test_all_terms_are_reported_and_weighted() -> None:
    table = synthetic_items(64)
    model = initialised(tiny_model(), table)
    terms = model.compute_losses(table)
    assert set(terms) == {"loss", "align/text", *(f"{m}/{t}" for m in DIMS for t in ("recon", "codebook", "commitment"))}
    hp = model.hparams
    expected = sum(
        hp.recon_weight * terms[f"{m}/recon"]
        + hp.codebook_weight * terms[f"{m}/codebook"]
        + hp.commitment_weight * terms[f"{m}/commitment"]
        for m in DIMS
    ) + hp.align_weight * terms["align/text"]
    assert torch.allclose(terms["loss"], expected)


def test_absent_items_are_not_trained_on() -> None:
    """Whatever an absent item's stored vector holds, it changes no loss, no gradient and no code usage."""
    table = synthetic_items(64)
    model = initialised(tiny_model(), table)
    poisoned = dict(table, text=table["text"].clone())
    poisoned["text"][0] = 1e3
    torch.manual_seed(1)
    clean_terms = model.compute_losses(table)
    torch.manual_seed(1)
    poisoned_terms = model.compute_losses(poisoned)
    for name in clean_terms:
        assert torch.allclose(clean_terms[name], poisoned_terms[name]), name
    model.branches["text"].quantizer.reset_usage()
    model.compute_losses(table)
    assert model.branches["text"].quantizer.usage.sum(1).eq(63).all()


def test_initialise_ignores_absent_rows() -> None:
    table = synthetic_items(64)
    table["text_present"][:32] = False
    table["text"][:32] = 1e3
    model = initialised(tiny_model(), table)
    assert model.branches["text"].norm.mean.abs().max() < 100
    assert model.branches["text"].quantizer.codebook.abs().max() < 100


def test_quantize_is_deterministic_and_returns_the_contract() -> None:
    table = synthetic_items(64)
    model = initialised(tiny_model(), table)
    model.train()
    first = model.quantize(table, return_distances=True)
    second = model.quantize(table)
    assert model.training, "quantize must restore the training mode"
    for m in DIMS:
        assert first[m].dtype == torch.long and first[m].shape == (64, 2)
        assert torch.equal(first[m], second[m])
        assert torch.equal(first[f"{m}_present"], table[f"{m}_present"])
        assert first[f"{m}_last_distances"].shape == (64, 8)
        assert torch.equal(first[f"{m}_last_distances"].argmin(1), first[m][:, -1])
        books = model.codebooks()[m]
        assert len(books) == 2 and all(b.shape == (8, 8) and b.dtype == torch.float32 for b in books)
        rebuilt = books[0][first[m][:, 0]] + books[1][first[m][:, 1]]
        assert torch.allclose(model.quantized(table)[m], rebuilt, atol=1e-5)
        assert model.encode(table)[m].shape == (64, 8)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    table = synthetic_items(64)
    model = initialised(tiny_model(sinkhorn_last_level=False), table)
    config, weights = save_quantizer(model, tmp_path)
    assert config.name == "quantizer.json" and weights.name == "quantizer.safetensors"
    loaded = MMRQVAE.from_state(*read_quantizer(tmp_path))
    assert dict(loaded.hparams) == dict(model.hparams)
    for m in DIMS:
        assert torch.equal(loaded.quantize(table)[m], model.quantize(table)[m])
    assert all(bool(b.quantizer.initialised) for b in loaded.branches.values())


def test_compiled_sinkhorn_gives_the_eager_assignment() -> None:
    """``model.compile`` swaps in a compiled Sinkhorn (dynamic batch size): the same codes as eager."""
    model = MMRQVAE(input_dims={"collab": 8}, codebook_size=16, code_dim=4, hidden_dims=[8], compile=True)
    balance = model.branches["collab"].quantizer.balance_codes
    generator = torch.Generator().manual_seed(0)
    for rows in (64, 37):  # two batch sizes, one graph
        distances = torch.rand(rows, 16, generator=generator)
        assert torch.equal(balance(distances, 0.05, 30), sinkhorn_codes(distances, 0.05, 30))
    assert balance.compiled is not None  # compiled, not the eager fallback


def test_sinkhorn_compiles_once_for_every_batch_size() -> None:
    """Batches differ in size (items without a modality, the last batch): one dynamic graph must serve them
    all. A graph specialised to each size recompiled per batch until dynamo gave up (the Beauty quantizer
    spent most of its time there, bench/RESULTS.md session 6)."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(sinkhorn_codes, backend=counter, dynamic=True)
    for rows in (1024, 1023, 1021, 1018, 1016, 1013, 1009, 1004, 999, 837):
        compiled(torch.rand(rows, 16), 0.05, 3)
    assert counter.frame_count == 1
