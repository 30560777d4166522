"""The statistics of the empirical privacy audit (privacy.one_run_audit), against known answers:
the reference numbers of both papers' bounds, and mechanisms whose true epsilon is known."""

from __future__ import annotations

import numpy as np
import pytest
from dp_accounting import get_epsilon_gaussian

from privacy.one_run_audit import audit, epsilon_one_run, epsilon_one_run_fdp, p_value

# (canaries m, guesses r, correct v, significance, delta) -> the bound, computed once with the
# reference implementation of the papers' statistics (jax_privacy/auditing.py, 2025):
# Steinke et al. 2023 (one run) and Mahloujifar et al. 2024 (f-DP, Gaussian).
REFERENCE = [
    ((1000, 100, 90, 0.05, 1e-5), 1.62614, 2.45641),
    ((1000, 1000, 700, 0.05, 1e-5), 0.73174, 1.37198),
    ((1000, 200, 150, 0.05, 1e-5), None, 1.29692),
    ((1000, 200, 150, 0.05, 0.0), 0.82140, None),
    ((100, 50, 45, 0.05, 1e-5), 1.39279, 2.79302),
    ((1000, 500, 400, 0.01, 1e-6), 1.12555, 1.90813),
]


@pytest.mark.parametrize(("case", "one_run", "fdp"), REFERENCE)
def test_both_bounds_match_the_reference_numbers(case, one_run, fdp):
    if one_run is not None:
        assert epsilon_one_run(*case) == pytest.approx(one_run, abs=1e-4)
    if fdp is not None:
        assert epsilon_one_run_fdp(*case) == pytest.approx(fdp, abs=1e-4)


def test_guessing_at_chance_rejects_nothing():
    assert epsilon_one_run(1000, 100, 50, 0.05, 1e-5) == 0.0
    assert epsilon_one_run_fdp(1000, 100, 50, 0.05, 1e-5) == 0.0
    assert p_value(1000, 100, 50, 0.0, 0.0) > 0.4


def randomized_response(epsilon: float, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each canary's score is its inclusion bit, told truthfully with probability
    e^eps / (1 + e^eps): exactly epsilon-DP per canary."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < np.exp(epsilon) / (1 + np.exp(epsilon))
    scores = np.where(truthful, included, ~included).astype(float)
    return scores[included], scores[~included]


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 4.0])
def test_randomized_response_is_bounded_close_to_and_below_its_epsilon(epsilon):
    bound = audit(*randomized_response(epsilon, 1000, seed=7), confidence=0.95, delta=1e-5)
    assert 0.6 * epsilon < bound.epsilon <= epsilon
    assert bound.canaries == 1000 and 0 < bound.correct <= bound.guesses


def test_the_bound_exceeds_the_true_epsilon_in_at_most_about_5_percent_of_runs():
    above = sum(audit(*randomized_response(1.0, 200, seed), confidence=0.95, delta=0.0, guess_counts=[25, 50, 100]).epsilon > 1.0
                for seed in range(40))
    assert above <= 4  # 5% of 40 is 2; the Bonferroni split makes it rarer still


@pytest.mark.parametrize("mu", [1.0, 2.0])
def test_a_gaussian_mechanism_is_bounded_below_its_epsilon_and_fdp_is_tighter(mu):
    """Scores are the inclusion bit times mu plus N(0, 1): mu-GDP, whose epsilon at delta is known."""
    rng = np.random.default_rng(11)
    included = rng.random(1000) < 0.5
    scores = included * mu + rng.normal(size=1000)
    truth = get_epsilon_gaussian(1 / mu, 1e-5)
    counts = [50, 100, 200, 400]  # a short grid: the f-DP recursion is the slow part
    plain = audit(scores[included], scores[~included], 0.95, 1e-5, guess_counts=counts)
    fdp = audit(scores[included], scores[~included], 0.95, 1e-5, method="one-run-fdp", guess_counts=counts)
    assert 0 < plain.epsilon < fdp.epsilon <= truth


def test_ties_are_not_broken_by_inclusion():
    """All scores equal: the input order (included first) must not turn into correct guesses."""
    assert audit(np.zeros(500), np.zeros(500)).epsilon == 0.0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="method must be one of"):
        audit([1.0], [0.0], method="two-runs")
    with pytest.raises(ValueError, match="finite scores"):
        audit([float("nan")], [0.0])
