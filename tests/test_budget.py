import re
from dataclasses import replace
from pathlib import Path

import pytest

from privacy.budget import (
    BudgetExhausted,
    DPRequest,
    EffectiveDP,
    PolicyViolation,
    SitePolicy,
    check_budget,
    check_delta,
    resolve,
    site_policy,
)

DEFAULTS = SitePolicy(max_epsilon=10.0, delta=1e-5, min_noise_multiplier=0.3, require_dp=True)
LEDGER = Path("/var/lib/site/ledger.db")
POLICY = SitePolicy(max_epsilon=10.0, delta=1e-5, min_noise_multiplier=0.3, require_dp=True, ledger_path=LEDGER,
                    declared_examples=5000)


def request(**overrides) -> DPRequest:
    values = dict(dp=True, noise_multiplier=0.0, target_epsilon=0.0, delta=0.0, max_grad_norm=1.0, max_epsilon=0.0,
                  secure_noise=False, dp_mode="local", distributed_dp_colluders=0, distributed_probe_learning_rate=10.0,
                  distributed_learning_rate=1.0)
    return DPRequest(**(values | overrides))


def test_site_policy_defaults():
    assert site_policy({}) == DEFAULTS


def test_site_policy_reads_node_config_and_ignores_other_keys():
    node = {"max-epsilon": 4, "delta": 1e-6, "min-noise-multiplier": 0.8, "dp": False, "data-path": "/x",
            "ledger-path": str(LEDGER), "num-examples": 500, "report-metrics": "none",
            "metric-noise-multiplier": 20.0, "privacy-unit-column": "patient", "secure-noise": True}
    assert site_policy(node) == SitePolicy(
        4.0, 1e-6, 0.8, False, ledger_path=LEDGER, declared_examples=500, report_metrics="none",
        metric_noise_multiplier=20.0, privacy_unit_column="patient", secure_noise=True,
    )


@pytest.mark.parametrize(
    "node, setting",
    [
        ({"report-metrics": "exact"}, "report-metrics"),
        ({"metric-noise-multiplier": 0.2}, "metric-noise-multiplier"),  # below the noise floor
        ({"num-examples": 0}, "num-examples"),
        ({"num-examples": "many"}, "num-examples"),
        ({"secure-noise": "yes"}, "secure-noise"),
    ],
)
def test_bad_new_node_config_names_its_setting(node, setting):
    with pytest.raises(PolicyViolation) as caught:
        site_policy(node)
    assert caught.value.setting == setting


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("max-epsilon", 0, "must be > 0"),
        ("max-epsilon", -1.0, "must be > 0"),
        ("max-epsilon", "10", "must be a number"),
        ("max-epsilon", float("inf"), "must be finite"),
        ("delta", 1.0, "must be in (0, 1)"),
        ("delta", 0.0, "must be in (0, 1)"),
        ("delta", True, "must be a number"),
        ("min-noise-multiplier", -0.1, "must be >= 0"),
        ("dp", "false", "must be true or false"),
        ("dp", 0, "must be true or false"),
    ],
)
def test_bad_node_config_rejected(key, value, message):
    with pytest.raises(PolicyViolation) as caught:
        site_policy({key: value})
    text = str(caught.value)
    assert caught.value.setting == key
    assert text.startswith(f"node config {key} ")
    assert message in text and repr(value) in text


@pytest.mark.parametrize(
    "looser, setting, expected",
    [
        (dict(dp=False), "dp", "the server requests dp=false (non-private training), but this site requires differential privacy (node config dp=true)"),
        (dict(delta=1e-4), "delta", "the server requests delta 0.0001, above this site's delta 1e-05"),
        (dict(max_epsilon=20.0), "max-epsilon", "the server requests max-epsilon 20, above this site's max-epsilon 10"),
        (dict(noise_multiplier=0.1), "noise-multiplier", "the server requests noise-multiplier 0.1, below this site's min-noise-multiplier 0.3"),
    ],
)
def test_looser_requests_refused(looser, setting, expected):
    with pytest.raises(PolicyViolation, match=re.escape(expected)) as caught:
        resolve(POLICY, request(**looser))
    assert caught.value.setting == setting


def test_dp_needs_a_ledger_path_and_a_declared_size_from_the_node_config():
    with pytest.raises(PolicyViolation) as caught:
        resolve(DEFAULTS, request())
    assert caught.value.setting == "ledger-path"
    with pytest.raises(PolicyViolation) as caught:
        resolve(SitePolicy(10.0, 1e-5, 0.3, True, ledger_path=LEDGER), request())
    assert caught.value.setting == "num-examples"


def test_default_request_takes_site_settings():
    assert resolve(POLICY, request()) == EffectiveDP(
        enabled=True, delta=1e-5, max_epsilon=10.0, max_grad_norm=1.0, noise_multiplier=None, target_epsilon=10.0,
        min_noise_multiplier=0.3,
    )


def test_noise_floor_applies_to_every_sigma():
    effective = resolve(POLICY, request(target_epsilon=1000.0, max_epsilon=10.0))
    assert effective.at_least_the_floor(0.05) == 0.3 and effective.at_least_the_floor(2.0) == 2.0


def test_secure_noise_is_on_when_either_side_asks():
    assert resolve(POLICY, request(secure_noise=True)).secure_noise
    assert resolve(SitePolicy(10.0, 1e-5, 0.3, True, ledger_path=LEDGER, declared_examples=10, secure_noise=True), request()).secure_noise
    assert not resolve(POLICY, request()).secure_noise


def test_delta_must_be_below_one_over_n():
    check_delta(1e-5, 99_999)
    with pytest.raises(PolicyViolation) as caught:
        check_delta(1e-5, 100_000)
    assert caught.value.setting == "delta"


def test_stricter_requests_applied():
    effective = resolve(POLICY, request(delta=1e-7, max_epsilon=4.0, target_epsilon=3.0, max_grad_norm=0.5))
    assert effective == EffectiveDP(
        enabled=True, delta=1e-7, max_epsilon=4.0, max_grad_norm=0.5, noise_multiplier=None, target_epsilon=3.0,
        min_noise_multiplier=0.3,
    )


def test_equal_settings_are_not_looser():
    effective = resolve(POLICY, request(delta=1e-5, max_epsilon=10.0, noise_multiplier=0.3))
    assert (effective.delta, effective.max_epsilon, effective.noise_multiplier) == (1e-5, 10.0, 0.3)


def test_explicit_noise_multiplier_wins_over_target():
    effective = resolve(POLICY, request(noise_multiplier=1.2, target_epsilon=8.0))
    assert (effective.noise_multiplier, effective.target_epsilon) == (1.2, None)


def test_target_defaults_to_and_is_capped_by_max_epsilon():
    assert resolve(POLICY, request(max_epsilon=4.0)).target_epsilon == 4.0
    assert resolve(POLICY, request(target_epsilon=8.0, max_epsilon=4.0)).target_epsilon == 4.0
    assert resolve(SitePolicy(5.0, 1e-5, 0.3, True, ledger_path=LEDGER, declared_examples=10), request(target_epsilon=8.0)).target_epsilon == 5.0


def test_non_private_training_only_where_site_allows_it():
    allowing = SitePolicy(10.0, 1e-5, 0.3, require_dp=False, ledger_path=LEDGER, declared_examples=10)
    assert resolve(allowing, request(dp=False)) == EffectiveDP(
        enabled=False, delta=1e-5, max_epsilon=10.0, max_grad_norm=1.0, noise_multiplier=None, target_epsilon=None
    )
    # Allowing non-private training does not loosen the limits of private training.
    with pytest.raises(PolicyViolation, match="delta"):
        resolve(allowing, request(delta=1e-3))


def test_check_budget():
    check_budget(9.99, 10.0)
    check_budget(10.0, 10.0)
    with pytest.raises(BudgetExhausted) as caught:
        check_budget(10.5, 10.0)
    assert str(caught.value) == "budget exhausted: this round would bring epsilon to 10.5000 > max-epsilon 10.0000"
    with pytest.raises(BudgetExhausted, match="epsilon to inf"):
        check_budget(float("inf"), 10.0)


def test_a_run_may_spend_its_allowance_of_what_is_left():
    dp = resolve(POLICY, request(target_epsilon=8.0))
    assert dp.for_run(0.0).target_epsilon == 8.0 and dp.for_run(0.0).run_allowance == 8.0  # 80% of 10
    assert dp.for_run(5.0).run_allowance == pytest.approx(4.0) and dp.for_run(5.0).target_epsilon == pytest.approx(4.0)
    capped = resolve(replace(POLICY, max_epsilon_per_run=3.0), request(target_epsilon=8.0))
    assert capped.for_run(0.0).target_epsilon == 3.0
    assert capped.for_run(9.5).run_allowance == pytest.approx(0.5)  # never more than is left
    fixed_sigma = resolve(POLICY, request(noise_multiplier=1.0)).for_run(2.0)
    assert fixed_sigma.target_epsilon is None and fixed_sigma.run_allowance == pytest.approx(6.4)
    with pytest.raises(BudgetExhausted, match="earlier runs spent epsilon 10.0000"):
        dp.for_run(10.0)


@pytest.mark.parametrize("value", [11.0, -1.0, "2"])
def test_max_epsilon_per_run_must_fit_the_lifetime_budget(value):
    with pytest.raises(PolicyViolation) as caught:
        site_policy({"max-epsilon": 10.0, "max-epsilon-per-run": value})
    assert caught.value.setting == "max-epsilon-per-run"
    assert site_policy({"max-epsilon-per-run": 2.5}).max_epsilon_per_run == 2.5
