"""The statistics of the site-level estimate (``privacy.canary_cosines``), against known answers:
the Gaussian mechanism's exact ε (closed form and dp_accounting's PLD), the hockey-stick
divergence of two normals integrated numerically, and the exact law of a random cosine."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution
from scipy import optimize, stats

from privacy.canary_cosines import epsilon_between_gaussians, estimate_epsilon, log_hockey_stick

DELTA = 1e-5


def gaussian_mechanism_epsilon(sensitivity_over_sigma: float, delta: float) -> float:
    """Balle & Wang 2018, Thm. 8: δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ), μ = Δ/σ."""
    mu = sensitivity_over_sigma
    return optimize.brentq(
        lambda eps: stats.norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu) - delta, 0, 500)


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.0, 5.0])
def test_equal_stds_give_the_gaussian_mechanisms_exact_epsilon(mu):
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=1 / mu, sensitivity=1, value_discretization_interval=1e-4)
    epsilon = epsilon_between_gaussians((0.0, 1.0), (mu, 1.0), DELTA)
    assert epsilon == pytest.approx(gaussian_mechanism_epsilon(mu, DELTA), rel=1e-6)
    assert epsilon == pytest.approx(pld.get_epsilon_for_delta(DELTA), rel=1e-4)
    # Only the ratio of the shift to the std matters: cosines are tiny numbers.
    assert epsilon_between_gaussians((0.0, 0.004), (0.004 * mu, 0.004), DELTA) == pytest.approx(epsilon, rel=1e-6)


@pytest.mark.parametrize("p, q", [((0.0, 1.0), (3.0, 1.5)), ((3.0, 1.5), (0.0, 1.0)), ((0.0, 1.0), (1.0, 0.5))])
@pytest.mark.parametrize("epsilon", [0.0, 0.5, 2.0, 4.0])
def test_the_hockey_stick_divergence_of_unequal_normals_is_the_integral(p, q, epsilon):
    x = np.linspace(-25, 25, 2_000_001)
    integral = np.maximum(0, stats.norm.pdf(x, *p) - math.exp(epsilon) * stats.norm.pdf(x, *q)).sum() * (x[1] - x[0])
    closed = math.exp(log_hockey_stick(p, q, epsilon))
    assert closed == pytest.approx(integral, rel=1e-5, abs=1e-12)


def test_epsilon_is_zero_for_identical_laws_grows_with_the_shift_and_stays_finite_far_apart():
    assert epsilon_between_gaussians((0.0, 1.0), (0.0, 1.0), DELTA) == 0.0
    shifts = [epsilon_between_gaussians((0.0, 1.0), (mu, 1.0), DELTA) for mu in (0.5, 1, 2, 4)]
    assert shifts == sorted(shifts) and shifts[0] > 0
    # An unclipped leak: hundreds of null stds away, the estimate is large and finite.
    far = epsilon_between_gaussians((0.0, 0.0037), (0.5, 0.001), DELTA)
    assert 1e3 < far < math.inf
    with pytest.raises(ValueError, match="delta"):
        epsilon_between_gaussians((0.0, 1.0), (1.0, 1.0), 0.0)


@pytest.mark.parametrize("dimension", [1000, 5000])
def test_the_null_is_the_law_of_a_random_directions_cosine(dimension):
    """At d >= 1000 the cosine of a random direction with a fixed vector is N(0, 1/d), tails
    included."""
    rng = np.random.default_rng(dimension)
    # By rotation invariance the fixed vector may be e₁: cos = u₁ / ‖u‖, ‖u‖² = u₁² + χ²(d − 1).
    first = rng.standard_normal(400_000)
    cosines = first / np.sqrt(first**2 + rng.chisquare(dimension - 1, first.size))
    assert cosines.std() == pytest.approx(dimension ** -0.5, rel=0.01)
    for t in (1, 2, 3):
        assert (cosines >= t * dimension ** -0.5).mean() == pytest.approx(stats.norm.sf(t), abs=0.003)


@pytest.mark.parametrize("dimension", [1000, 20000])
def test_the_estimate_of_a_gaussian_mechanism_is_its_epsilon(dimension):
    """Cosines shifted by μ null stds, with the null's spread: the estimate is the Gaussian
    mechanism's ε at μ, up to the mean of 2,000 samples."""
    rng = np.random.default_rng(7)
    mu = 2.0
    seen = rng.normal(mu * dimension ** -0.5, dimension ** -0.5, 2000)
    unseen = rng.normal(0.0, dimension ** -0.5, 2000)
    estimate = estimate_epsilon(seen, unseen, dimension, DELTA)
    assert estimate.epsilon == pytest.approx(gaussian_mechanism_epsilon(mu, DELTA), rel=0.05)
    assert estimate.epsilon_interval[0] < gaussian_mechanism_epsilon(mu, DELTA) < estimate.epsilon_interval[1]
    assert estimate.null_std == pytest.approx(dimension ** -0.5) and estimate.null_consistent
    assert estimate.canaries == 2000 and estimate.dimension == dimension


def test_a_correct_mechanism_at_small_epsilon_is_not_flagged_and_its_estimate_is_unbiased():
    """100 canaries of a correct Gaussian mechanism at z = 5 over 4 rounds (ε 1.55), 40 draws:
    the estimate's median is within 10% of ε, and ε falls below the whole 95% interval (the
    alarm) in at most 3 of them (2.5% expected). Fitting the spread too, as Andrew et al. do,
    reads far higher (the module docstring)."""
    dimension, mu = 75_000, 2 / 5
    exact = gaussian_mechanism_epsilon(mu, DELTA)
    draws = [np.random.default_rng(seed).normal(0, dimension ** -0.5, (2, 100)) for seed in range(40)]
    estimates = [estimate_epsilon(seen + mu * dimension ** -0.5, unseen, dimension, DELTA) for seen, unseen in draws]
    assert np.median([e.epsilon for e in estimates]) == pytest.approx(exact, rel=0.1)
    assert sum(e.epsilon_interval[0] > exact for e in estimates) <= 3
    assert np.median([e.epsilon_fitted_spread for e in estimates]) > 1.4 * exact


def test_cosines_at_the_null_estimate_no_privacy_loss_worth_the_name():
    rng = np.random.default_rng(3)
    null = rng.normal(0.0, 0.01, (2, 1000))
    estimate = estimate_epsilon(null[0], null[1], 10_000, DELTA)
    assert estimate.epsilon < 1.0 and estimate.epsilon_interval[0] == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        estimate_epsilon(null[0][:1], null[1], 10_000, DELTA)
    with pytest.raises(ValueError, match="at least 1000 adapter values"):
        estimate_epsilon(null[0], null[1], 999, DELTA)
    assert not estimate_epsilon(null[0], null[1] * 2, 10_000, DELTA).null_consistent
