"""The Skellam mechanism of distributed DP (privacy/skellam.py) and its accounting: the bound is
attacked with the exact Renyi divergence of the one-dimensional mechanism, the sampler with its
moments, and the accountant with Opacus and dp-accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import skellam as scipy_skellam

from privacy import skellam
from privacy.accountant import calibrate_noise, epsilon_dp_accounting, epsilon_for
from privacy.skellam import SkellamRow


def exact_renyi(variance: float, shift: int, alpha: int) -> float:
    """D_alpha(Sk(variance) + shift || Sk(variance)), summed over the integers where either
    distribution has mass above 1e-300 (the rest cannot move it at this precision)."""
    half = variance / 2
    width = int(shift + 40 * math.sqrt(variance) + 200)
    k = np.arange(-width, width + 1)
    log_p = scipy_skellam.logpmf(k - shift, half, half)
    log_q = scipy_skellam.logpmf(k, half, half)
    both = np.isfinite(log_p) & np.isfinite(log_q)  # further out a pmf underflows to 0
    return float(logsumexp(alpha * log_p[both] + (1 - alpha) * log_q[both]) / (alpha - 1))


@pytest.mark.parametrize("variance, shift", [(2.0, 1), (10.0, 1), (10.0, 3), (100.0, 5), (1000.0, 20), (50.0, 7)])
def test_the_bound_is_above_the_exact_divergence_and_close_to_it_for_large_noise(variance, shift):
    """One coordinate moved by ``shift`` (D1 = D2 = shift <= shift^2): the exact Renyi divergence,
    both ways (the distribution is symmetric), never passes the bound, at every integer order."""
    z = math.sqrt(variance) / shift
    bound = skellam.rdp(z, float(shift))
    for alpha, limit in zip(skellam.INTEGER_ORDERS, bound, strict=True):
        exact = exact_renyi(variance, shift, alpha)
        assert exact <= limit * (1 + 1e-9) + 1e-12, (alpha, exact, limit)
        assert exact_renyi(variance, -shift, alpha) <= limit * (1 + 1e-9) + 1e-12
    # a wide noise makes Skellam as private as the Gaussian of the same variance
    if variance >= 1000:
        gaussian = np.asarray(skellam.INTEGER_ORDERS) / (2 * z**2)
        assert np.all(bound <= gaussian * 1.01)


def test_a_bound_below_the_exact_divergence_would_be_caught():
    """The check above can fail: a bound that counts three sites' shares when only one site's
    share is honest (the other two collude and subtract theirs) is below the exact divergence
    of the noise that is really there."""
    share, shift, sites = 100.0, 5, 3
    claimed = skellam.rdp(math.sqrt(sites * share) / shift, float(shift))
    exact = [exact_renyi(share, shift, alpha) for alpha in skellam.INTEGER_ORDERS]
    assert all(e > c for e, c in zip(exact, claimed, strict=True))


def test_the_dominating_gaussian_is_above_the_bound_at_every_order():
    for z, d2 in [(0.5, 1.0), (1.0, 3.0), (2.0, 100.0), (0.8, 1e4)]:
        z_g = skellam.dominating_gaussian(z, d2)
        gaussian = np.asarray(skellam.INTEGER_ORDERS) / (2 * z_g**2)
        assert np.all(gaussian >= skellam.rdp(z, d2) * (1 - 1e-12))  # equal at order 2 by construction
        assert z_g < z


def test_the_bound_refuses_fractional_orders_and_bad_parameters():
    with pytest.raises(ValueError, match="integer orders"):
        skellam.rdp(1.0, 10.0, orders=[1.5])
    with pytest.raises(ValueError, match="sensitivity"):
        skellam.rdp(1.0, 0.5)
    with pytest.raises(ValueError, match="positive"):
        skellam.rdp(0.0, 10.0)


def test_shares_add_up_to_the_central_variance():
    """Three sites' shares, summed, have the variance the accounting assumes (to sampling error),
    integer values and mean 0."""
    z, d2, sites = 1.5, 40.0, 3
    shares = [skellam.skellam_noise(200_000, (z * d2) ** 2 / sites) for _ in range(sites)]
    total = sum(shares)
    assert total.dtype == np.int64
    target = (z * d2) ** 2
    assert abs(total.var() / target - 1) < 0.02
    assert abs(total.mean()) < 4 * math.sqrt(target / total.size)
    # two draws are independent (nothing seeds them alike)
    assert not np.array_equal(shares[0], shares[1])


def test_skellam_rows_compose_on_integer_orders_and_agree_with_dp_accounting():
    """A history mixing Gaussian rows (a probe phase, a release) and Skellam rows: Opacus' RDP
    on the integer orders, and dp-accounting's dominating Gaussian, agree closely (the bound's
    discrete term is tiny at these sensitivities); the epsilon is above the one over every order
    (fewer orders, never a smaller epsilon) and grows with the rounds."""
    gaussian = [(1.2, 0.05, 300), (10.0, 1.0, 3)]
    rows = gaussian + [SkellamRow(3.0, 1.0, 10, 5000.0)]
    ours = epsilon_for(rows, 1e-5)
    assert ours > epsilon_for(gaussian, 1e-5)
    independent = epsilon_dp_accounting(rows, 1e-5)
    assert ours <= independent <= ours * 1.001
    assert epsilon_for(rows + [SkellamRow(3.0, 1.0, 1, 5000.0)], 1e-5) > ours
    # equal Skellam rows compose as one
    split = gaussian + [SkellamRow(3.0, 1.0, 4, 5000.0), SkellamRow(3.0, 1.0, 6, 5000.0)]
    assert epsilon_for(split, 1e-5) == pytest.approx(ours, rel=1e-12)


def test_the_prv_accountant_refuses_a_skellam_row():
    with pytest.raises(ValueError, match="no Skellam"):
        epsilon_for([SkellamRow(2.0, 1.0, 5, 100.0)], 1e-5, "prv")


def test_a_skellam_row_must_be_at_rate_one_with_a_real_sensitivity():
    with pytest.raises(ValueError, match="Skellam row"):
        epsilon_for([SkellamRow(2.0, 0.5, 5, 100.0)], 1e-5)
    with pytest.raises(ValueError, match="Skellam row"):
        epsilon_for([SkellamRow(2.0, 1.0, 5, 0.0)], 1e-5)


def test_calibration_finds_the_smallest_skellam_multiplier_for_the_target():
    d2 = 64.0 * 275
    z = calibrate_noise(8.0, 1e-5, [(1.0, 30)], skellam_sensitivity=d2)
    assert epsilon_for([SkellamRow(z, 1.0, 30, d2)], 1e-5) <= 8.0
    assert epsilon_for([SkellamRow(z * (1 - 1e-3), 1.0, 30, d2)], 1e-5) > 8.0
    # at this sensitivity it is the Gaussian's multiplier to within the integer-order grid
    assert z == pytest.approx(calibrate_noise(8.0, 1e-5, [(1.0, 30)]), rel=0.05)


def test_a_ledger_charges_a_distributed_round_and_the_audit_recomputes_it(tmp_path):
    """A site's ledger with a probe round (DP-SGD), a distributed round and a release: the rows
    name their mode, the budget check sees the Skellam row, and the audit recomputes every
    epsilon (Opacus on the integer orders, dp-accounting's dominating Gaussian) without a
    mismatch."""
    from privacy.audit import audit_ledger
    from privacy.budget import BudgetExhausted
    from privacy.ledger import Charge, PrivacyLedger

    path = tmp_path / "site.db"
    common = dict(run_id="r", delta=1e-5, accountant="rdp", max_epsilon=10.0, rng_mode="cpu")
    with PrivacyLedger(path) as ledger:
        ledger.charge([Charge("dp-sgd:probe", 1.1, 0.05, 300, 1.0)], round=1, **common)
        (spend,) = ledger.charge([Charge(skellam.MECHANISM, 2.5, 1.0, 1, 17_875.0)], round=2, **common)
        ledger.charge([Charge("release:eval", 10.0, 1.0, 1, 1.4142)], round=2, **common)
        assert spend.mechanism == "distributed:skellam"
        assert isinstance(ledger.history()[1], SkellamRow)
        assert spend.epsilon == pytest.approx(epsilon_for([(1.1, 0.05, 300), SkellamRow(2.5, 1.0, 1, 17_875.0)], 1e-5))
        with pytest.raises(BudgetExhausted):
            ledger.charge([Charge(skellam.MECHANISM, 0.3, 1.0, 5, 17_875.0)], round=3, **common)
    audit = audit_ledger(path)
    assert not audit.epsilon_mismatches and not audit.chain_problems
    # the site's own status counts the Skellam row too (a Gaussian reading of it would be lower)
    from privacy.site_status import site_status

    status = site_status(str(path), {"ledger-path": str(path), "max-epsilon": 10.0, "delta": 1e-5})
    assert status["spent"] == pytest.approx(audit.rows[-1].opacus_epsilon, rel=1e-12)
    assert status["spent"] > epsilon_for([(1.1, 0.05, 300), (2.5, 1.0, 1), (10.0, 1.0, 1)], 1e-5)
    assert [row.mechanism for row in audit.rows] == ["dp-sgd:probe", "distributed:skellam", "release:eval"]
    assert audit.rows[1].prv_epsilon is None and audit.rows[0].prv_epsilon is not None

