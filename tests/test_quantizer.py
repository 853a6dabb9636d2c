"""Residual quantizer (k-means init, dead-code re-seeding, Sinkhorn, straight-through), losses, code metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrec.metrics.codes import (
    code_perplexity,
    code_utilisation,
    kendall_tau_distances,
    reconstruction_cosine,
    unique_tuple_fraction,
)
from mmrec.models.quantizer_losses import info_nce, mk_mmd
from mmrec.models.residual_quantizer import ResidualQuantizer, kmeans, sinkhorn_codes, squared_distances


def clusters(k: int, per: int, dim: int, spread: float = 0.01, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` tight, well separated clusters of ``per`` points each; returns (points, cluster centres)."""
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(k, dim, generator=g)
    points = centres.repeat_interleave(per, 0) + spread * torch.randn(k * per, dim, generator=g)
    return points, centres


def test_kmeans_init_puts_one_code_on_each_cluster() -> None:
    torch.manual_seed(0)
    points, centres = clusters(k=8, per=20, dim=4)
    rq = ResidualQuantizer(num_levels=2, codebook_size=8, code_dim=4)
    rq.initialise(points, kmeans_iters=10)
    assert bool(rq.initialised)
    nearest_centre = squared_distances(rq.codebook[0].detach(), centres).min(1).values
    assert nearest_centre.max() < 0.01, "each first-level code should sit on a cluster centre"
    codes, _, _ = rq.nearest_codes(points)
    assert code_utilisation(codes[:, :1], 8) == [1.0]
    first_level_error = (points - rq.codebook[0].detach()[codes[:, 0]]).pow(2).sum(1).mean()
    random_book = points[torch.randperm(len(points))[:8]]
    assert first_level_error < squared_distances(points, random_book).min(1).values.mean()


def test_second_level_is_fitted_on_residuals() -> None:
    torch.manual_seed(0)
    points, _ = clusters(k=4, per=50, dim=3, spread=1.0)
    rq = ResidualQuantizer(num_levels=2, codebook_size=4, code_dim=3)
    rq.initialise(points, kmeans_iters=10)
    assert rq.codebook[1].detach().norm(dim=1).mean() < rq.codebook[0].detach().norm(dim=1).mean() / 3


def test_kmeans_with_fewer_points_than_codes_gives_distinct_codes() -> None:
    torch.manual_seed(0)
    centres = kmeans(torch.randn(3, 5), k=8, iters=5)
    assert centres.shape == (8, 5)
    assert len(torch.unique(centres, dim=0)) == 8


def test_reseed_moves_dead_codes_onto_pooled_residuals() -> None:
    torch.manual_seed(0)
    points, _ = clusters(k=4, per=16, dim=2)
    rq = ResidualQuantizer(num_levels=1, codebook_size=8, code_dim=2, reseed_pool_size=128)
    rq.initialise(points, kmeans_iters=5)
    with torch.no_grad():
        rq.codebook[0, 4:] = 1e6  # four codes far from all data: nobody picks them
    before = rq.codebook.detach().clone()
    rq.train()
    rq.reset_usage()
    rq(points)
    reseeded = rq.reseed_dead_codes(min_usage=1)
    assert sorted(reseeded[0].tolist()) == [4, 5, 6, 7]
    assert torch.equal(rq.codebook[0, :4], before[0, :4]), "live codes must not move"
    new = rq.codebook[0, 4:].detach()
    assert squared_distances(new, points).min(1).values.max() < 1e-10, "re-seeded codes sit on seen residuals"
    codes, _, _ = rq.nearest_codes(points)
    assert code_utilisation(codes, 8)[0] > 0.5


def test_reseed_does_nothing_without_recorded_batches() -> None:
    rq = ResidualQuantizer(num_levels=1, codebook_size=4, code_dim=2)
    rq.initialise(torch.randn(32, 2), kmeans_iters=2)
    before = rq.codebook.detach().clone()
    assert rq.reseed_dead_codes() == {}
    assert torch.equal(rq.codebook.detach(), before)


def test_eval_mode_records_nothing() -> None:
    rq = ResidualQuantizer(num_levels=1, codebook_size=4, code_dim=2)
    rq.initialise(torch.randn(32, 2), kmeans_iters=2)
    rq.eval()
    rq(torch.randn(16, 2))
    assert rq.usage.sum() == 0


def test_sinkhorn_balances_a_crowded_assignment() -> None:
    torch.manual_seed(0)
    points = torch.randn(64, 2) * 0.1
    book = torch.cat([torch.zeros(1, 2), torch.randn(7, 2) + 3])  # one code near all points, seven far away
    distances = squared_distances(points, book)
    assert torch.bincount(distances.argmin(1), minlength=8).max() == 64
    balanced = torch.bincount(sinkhorn_codes(distances, epsilon=0.003, iters=50), minlength=8)
    assert balanced.max() <= 12 and (balanced > 0).all()


def test_sinkhorn_is_used_only_when_balancing() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(num_levels=1, codebook_size=8, code_dim=2, sinkhorn_last_level=True, sinkhorn_iters=50)
    with torch.no_grad():
        rq.codebook[0] = torch.cat([torch.zeros(1, 2), torch.randn(7, 2) + 3])
    points = torch.randn(64, 2) * 0.1
    assert (rq(points, balance=False).codes == 0).all()
    assert len(torch.unique(rq(points, balance=True).codes)) == 8
    assert (rq.nearest_codes(points)[0] == 0).all(), "inference is nearest-code"


def test_straight_through_passes_the_gradient_unchanged() -> None:
    rq = ResidualQuantizer(num_levels=3, codebook_size=4, code_dim=5)
    rq.initialise(torch.randn(40, 5), kmeans_iters=3)
    z = torch.randn(10, 5, requires_grad=True)
    out = rq(z)
    weights = torch.randn(10, 5)
    (out.quantized * weights).sum().backward()
    assert torch.allclose(z.grad, weights)
    codes, quantized, _ = rq.nearest_codes(z)
    assert torch.allclose(out.quantized, quantized, atol=1e-6)
    assert torch.equal(out.codes, codes)


def test_codebook_loss_moves_only_codes_and_commitment_only_the_input() -> None:
    rq = ResidualQuantizer(num_levels=2, codebook_size=4, code_dim=3)
    rq.initialise(torch.randn(40, 3), kmeans_iters=3)
    z = torch.randn(8, 3, requires_grad=True)
    rq(z).codebook_loss.backward()
    assert z.grad is None and rq.codebook.grad.abs().sum() > 0
    rq.codebook.grad = None
    rq(z).commitment_loss.backward()
    assert rq.codebook.grad is None and z.grad.abs().sum() > 0


def test_last_distances_are_those_of_the_last_level() -> None:
    rq = ResidualQuantizer(num_levels=2, codebook_size=4, code_dim=3)
    z = torch.randn(30, 3)
    rq.initialise(z, kmeans_iters=3)
    codes, _, distances = rq.nearest_codes(z)
    residual = z - rq.codebook[0].detach()[codes[:, 0]]
    assert torch.allclose(distances, squared_distances(residual, rq.codebook[1].detach()), atol=1e-5)
    assert torch.equal(distances.argmin(1), codes[:, 1])


def test_mmd_is_zero_for_identical_samples_and_grows_with_a_shift() -> None:
    torch.manual_seed(0)
    x = torch.randn(128, 4)
    assert mk_mmd(x, x).abs() < 1e-6
    near, far = mk_mmd(x, torch.randn(128, 4) + 0.5), mk_mmd(x, torch.randn(128, 4) + 3)
    assert 0 < near < far


def test_mmd_compares_distributions_not_pairs() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    assert mk_mmd(x[torch.randperm(64)], x).abs() < 1e-6


def test_info_nce_prefers_matched_pairs() -> None:
    torch.manual_seed(0)
    a = torch.randn(32, 8)
    matched = info_nce(a, a + 0.1 * torch.randn(32, 8), temperature=0.1)
    shuffled = info_nce(a, a[torch.randperm(32)], temperature=0.1)
    assert matched < 0.1 < shuffled


def test_code_metrics_on_known_codes() -> None:
    codes = np.array([[0, 1], [0, 1], [1, 2], [2, 3]])
    assert code_utilisation(codes, codebook_size=4) == [0.75, 0.75]
    assert unique_tuple_fraction(codes) == 0.5
    perplexity = code_perplexity(codes, codebook_size=4)
    assert perplexity[0] == pytest.approx(np.exp(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))))
    assert code_perplexity(np.zeros((10, 1), dtype=int), 8) == [pytest.approx(1.0)]
    assert code_perplexity(np.arange(8)[:, None], 8) == [pytest.approx(8.0)]
    assert reconstruction_cosine(np.eye(3), 2 * np.eye(3)) == pytest.approx(1.0)


def test_kendall_tau_of_distances() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    assert kendall_tau_distances(x, 3 * x + 1, num_pairs=2000) == pytest.approx(1.0)
    assert abs(kendall_tau_distances(x, rng.normal(size=(200, 6)), num_pairs=2000)) < 0.1
    noisy = kendall_tau_distances(x, x + 0.3 * rng.normal(size=x.shape), num_pairs=2000)
    assert 0.3 < noisy < 1.0
    with pytest.raises(ValueError):
        kendall_tau_distances(x, x[:10])


def test_training_passes_count_each_levels_nearest_codes() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(num_levels=2, codebook_size=8, code_dim=2)
    rq.initialise(torch.randn(64, 2), kmeans_iters=3)
    rq.train()
    rq.reset_usage()
    batches = [torch.randn(32, 2), torch.randn(17, 2)]
    for batch in batches:
        rq(batch)
    codes = torch.cat([rq.nearest_codes(batch)[0] for batch in batches])
    expected = torch.stack([torch.bincount(codes[:, level], minlength=8) for level in range(2)]).to(rq.usage.dtype)
    assert torch.equal(rq.usage, expected)
