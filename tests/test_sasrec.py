"""SASRec: causality, padding invariance, item 0 as a real item, both losses, export and reload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.artifacts import read_table
from mmrec.artifacts.exports import read_sasrec, save_sasrec
from mmrec.artifacts.schemas import embeddings_to_numpy
from mmrec.data.datamodules import left_pad
from mmrec.errors import InputError
from mmrec.models.sasrec import SASRec

NUM_ITEMS = 30


def model(**kwargs) -> SASRec:
    torch.manual_seed(0)
    defaults = {"num_items": NUM_ITEMS, "hidden_size": 16, "num_blocks": 2, "num_heads": 2, "max_len": 8, "dropout": 0.0}
    return SASRec(**{**defaults, **kwargs}).eval()


def batch_of(histories: list[list[int]], max_len: int = 8) -> dict[str, torch.Tensor]:
    items, mask = left_pad([np.array(h) for h in histories], max_len)
    return {"user_idx": torch.arange(len(histories)), "history": items, "mask": mask, "target": torch.zeros(len(histories), dtype=torch.long)}


def test_output_at_a_position_ignores_later_items() -> None:
    sasrec = model()
    a, b = batch_of([[1, 2, 3, 4, 5]]), batch_of([[1, 2, 3, 9, 17]])
    with torch.no_grad():
        ha, hb = sasrec.encode(a["history"], a["mask"]), sasrec.encode(b["history"], b["mask"])
    assert torch.allclose(ha[:, :-2], hb[:, :-2], atol=1e-6)
    assert not torch.allclose(ha[:, -1], hb[:, -1], atol=1e-3)


def test_scores_do_not_depend_on_padding_or_batch_company() -> None:
    sasrec = model()
    alone = batch_of([[4, 7, 1]])
    crowded = batch_of([[2, 3, 5, 6, 8, 9, 10, 11], [4, 7, 1], [12]])
    with torch.no_grad():
        assert torch.allclose(sasrec.score_batch(alone)[0], sasrec.score_batch(crowded)[1], atol=1e-5)


def test_item_zero_is_an_item_not_padding() -> None:
    sasrec = model()
    with torch.no_grad():
        with_zero = sasrec.score_batch(batch_of([[0, 0, 5]]))
        without = sasrec.score_batch(batch_of([[5]]))
    assert not torch.allclose(with_zero, without, atol=1e-3)


def test_histories_longer_than_max_len_keep_the_most_recent_items() -> None:
    sasrec = model(max_len=4)
    long, tail = batch_of([[9, 9, 9, 1, 2, 3, 4]], max_len=50), batch_of([[1, 2, 3, 4]], max_len=50)
    with torch.no_grad():
        assert torch.allclose(sasrec.score_batch(long), sasrec.score_batch(tail), atol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_a_training_step_reduces_the_loss(loss: str) -> None:
    sasrec = model(loss=loss, num_negatives=4, item_bias=True).train()
    histories = [np.array([1, 2, 3, 4, 5]), np.array([6, 7, 8])]
    items, mask = left_pad([h[:-1] for h in histories], 8)
    targets, _ = left_pad([h[1:] for h in histories], 8)
    targets[~mask] = -100
    batch = {"user_idx": torch.arange(2), "history": items, "mask": mask, "targets": targets}
    optimizer = torch.optim.Adam(sasrec.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        torch.manual_seed(1)  # same negatives each step, so the losses are comparable
        loss_value = sasrec.training_loss(batch)
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
        losses.append(float(loss_value.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("loss", ["ce", pytest.param("bce", marks=pytest.mark.slow)])
def test_compiled_training_gives_the_eager_loss_and_gradients(loss: str) -> None:
    """``compile`` pads to max_len and (for ce) ignores padding instead of selecting real positions: the same
    loss and gradients for a batch shorter than max_len (one compilation, some 20 s on a CPU)."""
    histories = [np.array([1, 2, 3, 4, 5]), np.array([6, 7, 8]), np.array([9, 0, 3, 11, 12, 13, 14, 15, 16, 17])]
    items, mask = left_pad([h[:-1] for h in histories], 8)
    targets, _ = left_pad([h[1:] for h in histories], 8)
    targets[~mask] = -100
    batch = {"history": items[:, -5:], "mask": mask[:, -5:], "targets": targets[:, -5:]}  # padded to 8 when compiled
    results = []
    for compiled in (False, True):
        sasrec = model(loss=loss, item_bias=True, compile=compiled)
        torch.manual_seed(3)  # the same bce negatives in both runs
        value = sasrec.training_loss(batch)
        value.backward()
        results.append((value.detach(), sasrec.item_embedding.weight.grad.clone()))
    assert all(fn.compiled is not None for fn in sasrec._compiled.values())  # compiled, not the eager fallback
    (eager, eager_grad), (fast, fast_grad) = results
    assert torch.allclose(eager, fast, rtol=1e-5, atol=1e-6), (eager, fast)
    assert torch.allclose(eager_grad, fast_grad, rtol=1e-4, atol=1e-6)


def test_prefix_batches_train_on_the_last_position() -> None:
    sasrec = model().train()
    batch = batch_of([[1, 2], [3, 4, 5]])
    batch["target"] = torch.tensor([3, 6])
    assert torch.isfinite(sasrec.training_loss(batch))


def test_export_writes_embeddings_and_reloads_the_same_model(tmp_path: Path) -> None:
    sasrec = model(item_bias=True)
    trained = np.arange(NUM_ITEMS) != 2  # item 2 never occurs in training (a new item)
    files = save_sasrec(sasrec, tmp_path, trained)
    matrix, present = embeddings_to_numpy(read_table(files["emb_collab"], "embeddings"), files["emb_collab"])
    assert matrix.shape == (NUM_ITEMS, 16) and np.array_equal(present, trained)
    assert np.allclose(matrix[trained], sasrec.item_embedding.weight.detach().numpy()[trained])
    assert not matrix[2].any()  # its untrained initial row is not exported as if it were learnt
    reloaded = SASRec.from_state(*read_sasrec(files["sasrec_config"], files["sasrec"])).eval()
    batch = batch_of([[1, 2, 3], [4]])
    with torch.no_grad():
        assert torch.equal(reloaded.score_batch(batch), sasrec.score_batch(batch))


def test_bad_hyperparameters_are_user_errors() -> None:
    with pytest.raises(InputError, match="num_heads"):
        SASRec(num_items=10, hidden_size=10, num_heads=3)
