"""The training plan (``privacy.plan``): the schedule a site trains with and what the run will cost
it, round by round, computed before training from the same numbers the site then trains with."""

from __future__ import annotations

import pytest

from fedlora.run_config import apply_overrides, default_run_config
from privacy.accountant import epsilon_for
from privacy.budget import EffectiveDP
from privacy.plan import FINE_TUNE, PROBE, Phase, choose_schedule, phase_of, plan_run, public_population
from tests.conftest import settings_of


def effective(**overrides) -> EffectiveDP:
    values = dict(enabled=True, delta=1e-5, max_epsilon=10.0, max_grad_norm=1.0, noise_multiplier=None,
                  target_epsilon=8.0, min_noise_multiplier=0.3)
    return EffectiveDP(**(values | overrides))


def one_phase(sample_rate=0.05, steps=40, rounds=3) -> tuple[Phase, ...]:
    return (Phase(FINE_TUNE, 1, rounds, round(sample_rate * 1000), sample_rate, steps, 0.01),)


def config(**overrides):
    return apply_overrides(default_run_config(), overrides)


def test_a_calibrated_plan_ends_at_the_target_with_its_releases_counted():
    plan = plan_run(effective(), one_phase(), 10.0)
    assert plan.epsilon_after_round[-1] == pytest.approx(8.0, rel=2e-3) and plan.epsilon_after_round[-1] <= 8.0
    assert list(plan.epsilon_after_round) == sorted(plan.epsilon_after_round)
    # Leaving the releases out would under-count: the same sigma spends less without them.
    without = epsilon_for([(plan.noise_multiplier, 0.05, 120)], 1e-5)
    assert without < plan.epsilon_after_round[-1]
    assert plan_run(effective(), one_phase(), None).noise_multiplier < plan.noise_multiplier


def test_one_sigma_covers_both_phases_and_each_round_costs_what_its_phase_does():
    phases = choose_schedule(settings_of(config()), 400, private=True)
    assert [p.name for p in phases] == [PROBE, FINE_TUNE]
    plan = plan_run(effective(), phases, 10.0)
    sigma, (probe, tune) = plan.noise_multiplier, phases
    releases = lambda phase, r: [(10.0, phase.sample_rate, r), (10.0, 1.0, r)]  # noqa: E731
    assert plan.epsilon_after_round[0] == pytest.approx(
        epsilon_for([(sigma, probe.sample_rate, probe.steps_per_round)] + releases(probe, 1), 1e-5))
    assert plan.epsilon_after_round[2] == pytest.approx(epsilon_for(
        [(sigma, probe.sample_rate, probe.steps_per_round), (sigma, tune.sample_rate, 2 * tune.steps_per_round)]
        + releases(probe, 1) + releases(tune, 2), 1e-5))
    assert plan.epsilon_after_round[2] == pytest.approx(8.0, rel=2e-3) and plan.epsilon_after_round[2] <= 8.0


def test_the_noise_floor_holds_in_the_plan():
    generous = effective(target_epsilon=1000.0, max_epsilon=1000.0, min_noise_multiplier=0.8)
    assert plan_run(generous, one_phase(), 10.0).noise_multiplier == 0.8
    assert plan_run(effective(noise_multiplier=0.5, min_noise_multiplier=0.8), one_phase(), None).noise_multiplier == 0.8


def test_the_schedule_takes_hundreds_of_probe_steps_at_a_small_rate_from_the_public_size():
    probe, tune = choose_schedule(settings_of(config()), 1032, private=True)
    assert (probe.first_round, probe.last_round, tune.first_round, tune.last_round) == (1, 1, 2, 3)
    assert probe.steps_per_round >= 200 and probe.sample_rate < 0.1
    assert tune.batch_size == 128 and tune.steps_per_round == 9  # one epoch of 1032 units
    # Without DP the fine-tune batch is small (no noise to average out) and it takes 3 epochs.
    _, plain = choose_schedule(settings_of(config()), 1032, private=False)
    assert plain.batch_size == 32 and plain.steps_per_round == 3 * 33
    # One large site gets at most 100 planned steps a round, unless its epochs are set.
    assert choose_schedule(settings_of(config()), 3871, private=False)[1].steps_per_round == 100
    assert choose_schedule(settings_of(config(**{"local-epochs": 3})), 3871, private=False)[1].steps_per_round == 3 * 121


def test_an_explicit_setting_wins_over_the_plan():
    probe, tune = choose_schedule(settings_of(config(**{"batch-size": 7, "local-steps": 5, "learning-rate": 0.1,
                                            "probe-steps": 11, "probe-batch-size": 9, "probe-learning-rate": 0.2,
                                            "probe-rounds": 2, "num-server-rounds": 4})), 500, private=True)
    assert (probe.batch_size, probe.steps_per_round, probe.learning_rate, probe.last_round) == (9, 11, 0.2, 2)
    assert (tune.batch_size, tune.steps_per_round, tune.learning_rate, tune.first_round) == (7, 5, 0.1, 3)
    assert tune.sample_rate == pytest.approx(7 / 500)


def test_probe_rounds_zero_and_causal_lm_fine_tune_throughout():
    for settings in ({"probe-rounds": 0}, {"task": "causal-lm"}):
        (only,) = choose_schedule(settings_of(config(**settings)), 500, private=True)
        assert (only.name, only.first_round, only.last_round) == (FINE_TUNE, 1, 3)
    (only,) = choose_schedule(settings_of(config(**{"probe-rounds": 5})), 500, private=True)  # all 3 rounds probe
    assert (only.name, only.last_round) == (PROBE, 3)
    # A resumed run given more rounds than planned continues the last phase.
    assert phase_of((only,), 7) is only


def test_public_population_is_the_declared_share():
    assert public_population(500, 0.2) == 400 and public_population(500, 0.2, held_out=True) == 100
    assert public_population(1, 0.5) == 1
