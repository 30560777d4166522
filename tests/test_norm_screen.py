"""The default screen on update size (strategies.norm_screen), rule by rule."""

import pytest

from strategies.norm_screen import NormScreen


def test_two_sites_the_boosted_one_is_rejected_the_honest_one_kept():
    # With the median of *all* norms, (1 + 1e6) / 2 would be the reference and 1e6 would pass.
    rejected = NormScreen().reasons({0: 1.0, 1: 1e6})
    assert set(rejected) == {1}
    assert "update-norm-ratio 10" in rejected[1] and "1e+06" in rejected[1]


def test_honest_spread_within_the_ratio_passes():
    assert NormScreen().reasons({0: 0.5, 1: 1.0, 2: 4.0, 3: 2.0}) == {}


@pytest.mark.parametrize("attacker_norm, rejected", [(9.9, False), (10.1, True)])
def test_the_bound_is_ratio_times_the_median_of_the_others(attacker_norm, rejected):
    # Others' median is 1.0 (0.5, 1.0, 1.5): bound 10.
    result = NormScreen(ratio=10).reasons({0: 0.5, 1: 1.0, 2: 1.5, 3: attacker_norm})
    assert (3 in result) is rejected and set(result) <= {3}


def test_a_zero_update_is_a_free_rider_and_does_not_lower_the_reference():
    rejected = NormScreen().reasons({0: 1.0, 1: 0.0})
    assert set(rejected) == {1} and "nothing was trained" in rejected[1]


def test_a_lone_update_is_judged_by_the_last_accepted_round():
    screen = NormScreen()
    assert screen.reasons({0: 1.0, 1: 2.0, 2: 3.0}) == {}
    assert set(screen.reasons({5: 100.0})) == {5}  # median 2.0 of round before: bound 20
    assert screen.reasons({5: 15.0}) == {}


def test_first_lone_update_has_no_reference():
    assert NormScreen().reasons({0: 1e9}) == {}


def test_ratio_zero_switches_the_relative_rule_off_but_not_the_absolute_bound():
    assert NormScreen(ratio=0).reasons({0: 1.0, 1: 1e6}) == {}
    rejected = NormScreen(ratio=0, max_norm=5.0).reasons({0: 1.0, 1: 6.0})
    assert set(rejected) == {1} and "max-update-norm 5" in rejected[1]


def test_restore_gives_a_resumed_run_its_reference():
    screen = NormScreen()
    screen.restore([1.0, 1.0])
    assert set(screen.reasons({0: 50.0})) == {0}
