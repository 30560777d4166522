"""The noised metric releases (``privacy.release``): sensitivity, noise scale, the ledger charge
they stand for, and what one bad record can and cannot do to them."""

from __future__ import annotations

import math

import pytest
import torch

from privacy import release
from privacy.release import (
    LOSS_BOUND, clip_losses, eval_charge, noised_evaluation, noised_train_loss, per_unit_means, train_loss_charge,
)


def test_per_unit_means_average_each_units_rows():
    values = torch.tensor([1.0, 3.0, 10.0, 2.0])
    assert per_unit_means(values, [7, 7, 2, 9]).tolist() == [10.0, 2.0, 2.0]  # units 2, 7, 9
    assert per_unit_means(torch.zeros(0), []).numel() == 0


def test_a_non_finite_loss_is_clipped_in_a_release(monkeypatch):
    """The attack: a record whose loss is NaN under the server's adapter made the released
    value NaN, telling the server that such a record exists. Now it counts as L."""
    monkeypatch.setattr(release, "_gaussian", lambda count, std, secure: [0.0] * count)
    losses = torch.tensor([0.5, float("nan"), float("inf"), -float("inf")])
    assert clip_losses(losses).tolist() == [0.5, LOSS_BOUND, LOSS_BOUND, 0.0]
    charge = train_loss_charge(10.0, 1.0, "row")
    assert math.isfinite(noised_train_loss(losses, 4, charge, secure=False))
    evaluation = noised_evaluation(losses, torch.tensor([1.0, float("nan"), 0.0, 1.0]), 4, eval_charge(10.0, "row"), False)
    assert all(math.isfinite(v) for v in evaluation.values())


def test_one_unit_moves_the_noise_free_releases_by_at_most_their_sensitivity(monkeypatch):
    """Add one unit with the worst values: the clipped loss sum moves by at most L, the pair
    (loss / L, accuracy) by at most sqrt(2) in L2, which is what the ledger records."""
    monkeypatch.setattr(release, "_gaussian", lambda count, std, secure: [0.0] * count)
    losses, accuracies = torch.rand(50) * 3, (torch.rand(50) > 0.5).double()
    worst_loss, worst_accuracy = torch.tensor([1e6]), torch.tensor([1.0])
    n, q = 50, 1.0
    charge = train_loss_charge(10.0, q, "row")
    moved = (noised_train_loss(torch.cat([losses, worst_loss]), n, charge, False) - noised_train_loss(losses, n, charge, False)) * q * n
    assert moved == pytest.approx(LOSS_BOUND) and charge.sensitivity == LOSS_BOUND
    before = noised_evaluation(losses, accuracies, n, eval_charge(10.0, "row"), False)
    after = noised_evaluation(torch.cat([losses, worst_loss]), torch.cat([accuracies, worst_accuracy]), n, eval_charge(10.0, "row"), False)
    shift = math.hypot((after["eval-loss"] - before["eval-loss"]) * n / LOSS_BOUND, (after["eval-accuracy"] - before["eval-accuracy"]) * n)
    assert shift == pytest.approx(math.sqrt(2)) and eval_charge(10.0, "row").sensitivity == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("secure", [False, True])
def test_release_noise_has_the_charged_scale(secure):
    """2,000 releases of the same sum: their spread is sigma * sensitivity / (q n)."""
    sigma, q, n = 3.0, 0.5, 40
    losses = torch.full((20,), 1.0)
    charge = train_loss_charge(sigma, q, "row")
    draws = torch.tensor([noised_train_loss(losses, n, charge, secure) for _ in range(2000)])
    assert draws.mean().item() == pytest.approx(20 / (q * n), abs=4 * sigma * LOSS_BOUND / (q * n) / 2000 ** 0.5)
    assert draws.std().item() == pytest.approx(sigma * LOSS_BOUND / (q * n), rel=0.06)
