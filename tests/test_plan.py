"""The DP plan (``privacy.plan``): what a run will cost a site, round by round, computed before
training from the same numbers the site then trains with."""

from __future__ import annotations

import pytest

from privacy.accountant import epsilon_for
from privacy.budget import EffectiveDP
from privacy.plan import plan_run, public_population


def effective(**overrides) -> EffectiveDP:
    values = dict(enabled=True, delta=1e-5, max_epsilon=10.0, max_grad_norm=1.0, noise_multiplier=None,
                  target_epsilon=8.0, min_noise_multiplier=0.3)
    return EffectiveDP(**(values | overrides))


def test_a_calibrated_plan_ends_at_the_target_with_its_releases_counted():
    plan = plan_run(effective(), 0.05, 40, 3, 10.0)
    assert plan.epsilon_after_round[-1] == pytest.approx(8.0, rel=2e-3) and plan.epsilon_after_round[-1] <= 8.0
    assert list(plan.epsilon_after_round) == sorted(plan.epsilon_after_round)
    # Leaving the releases out would under-count: the same sigma spends less without them.
    without = epsilon_for([(plan.noise_multiplier, 0.05, 120)], 1e-5)
    assert without < plan.epsilon_after_round[-1]
    assert plan_run(effective(), 0.05, 40, 3, None).noise_multiplier < plan.noise_multiplier


def test_the_noise_floor_holds_in_the_plan():
    assert plan_run(effective(target_epsilon=1000.0, max_epsilon=1000.0, min_noise_multiplier=0.8), 0.05, 40, 3, 10.0).noise_multiplier == 0.8
    assert plan_run(effective(noise_multiplier=0.5, min_noise_multiplier=0.8), 0.05, 40, 3, None).noise_multiplier == 0.8


def test_public_population_is_the_declared_share():
    assert public_population(500, 0.2) == 400 and public_population(500, 0.2, held_out=True) == 100
    assert public_population(1, 0.5) == 1
