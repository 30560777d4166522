"""Epsilon from a DP-SGD history, its independent cross-check, and noise calibration.

A site's whole privacy spend is its *history*: one row ``(sigma, q, T)`` per round it trained
in, where sigma is the noise multiplier, q the Poisson sampling rate and T the number of noisy
steps. Each step is the subsampled Gaussian mechanism M = G_sigma o Poisson_q, so the site has
run the adaptive composition of M_1^{T_1}, ..., M_k^{T_k} and, in Renyi DP (Mironov 2017)::

    RDP(alpha) = sum_i T_i * rdp_{q_i, sigma_i}(alpha)
    epsilon(delta) = min_alpha  RDP(alpha) + log((alpha - 1) / alpha)
                                - (log(delta) + log(alpha)) / (alpha - 1)

(the conversion is Balle et al. 2020, Thm. 21). Opacus computes this for ``"rdp"``; its
``"prv"`` accountant composes privacy-loss random variables numerically instead (Gopi et al.
2021), which is tighter. Epsilon depends on nothing but the history, which is why the ledger
persists exactly these rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from numbers import Integral, Real

import dp_accounting
import numpy as np
from absl import logging as absl_logging
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from privacy import skellam
from privacy.budget import BudgetExhausted
from privacy.skellam import SkellamRow

History = list[tuple[float, float, int] | SkellamRow]
"""(noise_multiplier, sample_rate, steps) per round: Opacus' accountant history format; and, for
a distributed-DP round, a :class:`~privacy.skellam.SkellamRow` (four fields)."""

ACCOUNTANTS = ("rdp", "prv")

DP_ACCOUNTING_RTOL = 1e-2
"""Relative gap tolerated between Opacus' RDP epsilon and :func:`epsilon_dp_accounting`.

Measured (opacus 1.6.0, dp-accounting 0.6.0, both on Opacus' default orders): the RDP of the
subsampled Gaussian at *integer* orders is the same closed form in both and agrees to ~1e-14.
At *fractional* orders dp-accounting sums the absolute values of the alternating series of
Mironov et al. 2019, Sec. 3.3, an upper bound; Opacus keeps the signs and is exact (checked
against numerical integration of A_alpha: e.g. q=0.02, sigma=0.5, alpha=1.4 gives
log A = 0.0031566 by quadrature and in Opacus, 0.0034575 in dp-accounting). So dp-accounting's
epsilon is never below Opacus' (but see the last corner) and the gap grows as the optimal order approaches 1, i.e. with
epsilon. Over q in {0.005 .. 0.2}, 1 to 10 epochs, delta = 1e-5, sigma calibrated to a target:

    epsilon <= 2: gap < 1e-5;  4: <= 2.1e-4;  8: <= 1.2e-3;  10: <= 3.1e-3;  20: <= 5.9e-3;
    50: up to 0.19 (optimal order ~1.4).

Typical single histories (sigma 1, q 0.01, 1000 steps; mixed multi-row ones) agree to 1e-6.
1e-2 covers every measured history with epsilon <= 20 with margin; above that (sites whose
budget allows it) the cross-check can report a gap that is dp-accounting's looseness, not an
Opacus error. Another corner: when the total RDP is below delta^2 at some order (delta >= 1e-4
and a handful of steps at q <= 1e-3) dp-accounting proves (0, delta)-DP from the KL bound and
returns 0 where Opacus reports up to ~0.3.
"""

# Opacus' order grid; the independent recomputation uses the same one so the two agree.
RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)

_MAX_SIGMA = 1e6  # as in opacus.accountants.utils.get_noise_multiplier
_SIGMA_RTOL = 1e-3  # calibrate_noise's precision on sigma
_CLOSE = _SIGMA_RTOL * (1 - 1e-9)  # the step of a closing probe


def epsilon_for(history: Sequence[tuple[float, float, int] | SkellamRow], delta: float, accountant: str = "rdp") -> float:
    """Epsilon after composing every row of ``history``, at ``delta``, with Opacus.

    An empty history has spent nothing (0.0). A row with sigma = 0 is non-private training:
    no finite epsilon covers it, so the result is ``math.inf``. Rows with equal (sigma, q)
    are composed as one (see :func:`_contributing`). A history with a Skellam row (distributed
    DP) composes in RDP over the integer orders, where the Skellam bound holds
    (:mod:`privacy.skellam`); Opacus' PRV accountant has no Skellam mechanism, so ``"prv"``
    refuses it.
    """
    engine = _opacus_accountant(accountant)
    _check_delta(delta)
    rows, skellam_rows = _contributing(history)
    if not rows and not skellam_rows:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in rows):
        return math.inf
    if skellam_rows:
        if accountant != "rdp":
            raise ValueError(f"the {accountant} accountant has no Skellam mechanism (distributed DP): use rdp")
        at_integers = [RDPAccountant.DEFAULT_ALPHAS.index(a) for a in skellam.INTEGER_ORDERS]
        rdp = sum([_rdp_per_step(sigma, q)[at_integers] * steps for sigma, q, steps in rows],
                  start=sum(skellam.rdp(z, d2) * steps for z, _, steps, d2 in skellam_rows))
        epsilon = get_privacy_spent(orders=list(skellam.INTEGER_ORDERS), rdp=rdp, delta=delta)[0]
    elif accountant == "rdp":
        # What RDPAccountant.get_epsilon computes, term for term, with each row's per-step RDP
        # computed once per process (see _rdp_per_step).
        rdp = sum([_rdp_per_step(sigma, q) * steps for sigma, q, steps in rows])
        epsilon = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)[0]
    else:
        engine.history = rows
        epsilon = engine.get_epsilon(delta)
    # Opacus' RDP conversion can dip just below 0 at large delta; epsilon >= 0 always holds.
    return max(0.0, float(epsilon))


@lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """One step's RDP at Opacus' orders, as Opacus' ``compute_rdp`` gives it (which returns
    this vector times the steps). It takes 0.05 to 0.12 s (a series per fractional order), and noise
    calibration asks for the same rows' epsilon with one new sigma at a time: a site's plan
    took 4.3 s of its round without this cache. Read-only, since it is shared."""
    vector = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    vector.setflags(write=False)
    return vector


def epsilon_dp_accounting(history: Sequence[tuple[float, float, int] | SkellamRow], delta: float) -> float:
    """The same RDP epsilon as :func:`epsilon_for` (``"rdp"``), recomputed with Google's
    ``dp_accounting``: each distinct (sigma, q) of the history is the event
    ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), T)``, on Opacus' order grid.

    Agrees with Opacus to within :data:`DP_ACCOUNTING_RTOL` (see there for the measurement).
    dp-accounting has no Skellam event: a Skellam row enters as the Gaussian that dominates its
    bound (:func:`privacy.skellam.dominating_gaussian`, on all of the site's units), on the
    integer orders, so the recomputation is an upper bound that checks the bound's main term.
    """
    _check_delta(delta)
    rows, skellam_rows = _contributing(history)
    if not rows and not skellam_rows:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in rows):
        return math.inf
    engine = RdpAccountant(orders=list(skellam.INTEGER_ORDERS if skellam_rows else RDP_ORDERS))
    # At large sample rates (q ~ 0.3) dp-accounting's series for fractional orders near 1 may
    # not converge; it then drops those orders (its bound only gets looser) and logs a warning
    # per order and row, which would bury an audit's output. The tolerance check still applies.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        for sigma, q, steps in rows:
            step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            engine.compose(dp_accounting.SelfComposedDpEvent(step, steps))
        for z, _, steps, d2 in skellam_rows:
            engine.compose(dp_accounting.GaussianDpEvent(skellam.dominating_gaussian(z, d2)), steps)
        return float(engine.get_epsilon(delta))
    finally:
        absl_logging.set_verbosity(verbosity)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    phases: Sequence[tuple[float, int]],
    accountant: str = "rdp",
    prior: Sequence[tuple[float, float, int]] = (),
    skellam_sensitivity: float | None = None,
) -> float:
    """Smallest sigma (to 0.1 %) with ``epsilon_for(prior + [(sigma, q, T) for (q, T) in phases])
    <= target_epsilon``: one sigma shared by every phase (a phase: T steps at sampling rate q).
    With ``skellam_sensitivity`` D2 the phases are Skellam rows ``SkellamRow(sigma, 1, T, D2)``
    instead (distributed DP, q = 1).

    Epsilon falls monotonically as sigma grows, so a bracket [low, high] with
    epsilon(low) > target >= epsilon(high), shrunk until high - low <= 1e-3 * high, finds it:
    the returned sigma (high) meets the target, and sigma * (1 - 1e-3) does not. The bracket
    shrinks by probes aimed at the answer (:func:`_aim`), with bisection as the fallback.
    Raises :class:`BudgetExhausted` when ``prior`` alone already reaches the target (no amount
    of noise then helps).
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon!r}")
    phases = list(phases)
    if not phases:
        raise ValueError("calibrate_noise needs at least one phase of steps")
    for sample_rate, steps in phases:
        if not (isinstance(steps, Integral) and not isinstance(steps, bool) and steps > 0):
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    steps = sum(t for _, t in phases)
    prior_rows = list(prior)
    spent = epsilon_for(prior_rows, delta, accountant)
    if spent >= target_epsilon:
        raise BudgetExhausted(
            f"budget exhausted: previous rounds already spent epsilon {spent:.4f} "
            f">= target-epsilon {target_epsilon:.4f}"
        )

    def epsilon(sigma: float) -> float:
        if skellam_sensitivity is not None:
            rows = [SkellamRow(sigma, 1.0, t, skellam_sensitivity) for _, t in phases]
            return epsilon_for(prior_rows + rows, delta, accountant)
        return epsilon_for(prior_rows + [(sigma, q, t) for q, t in phases], delta, accountant)

    # Invariant: epsilon(low) > target >= epsilon(high); sigma = 0 is non-private (inf).
    low, high = 0.0, 1.0
    seen = [(high, epsilon(high))]  # every (sigma, epsilon) evaluated, in order
    while seen[-1][1] > target_epsilon:
        low, high = high, 2 * high
        if high > _MAX_SIGMA:
            raise BudgetExhausted(
                f"budget exhausted: previous rounds spent epsilon {spent:.4f}; even noise "
                f"multiplier {_MAX_SIGMA:g} cannot keep {steps} more steps within target-epsilon "
                f"{target_epsilon:.4f}"
            )
        seen.append((high, epsilon(high)))
    step, aimed_from, missed = "aim", high - low, 0  # step: aim, close (after an aim) or bisect
    while high - low > _SIGMA_RTOL * high:
        probe = None
        if step == "close":  # the aim's probe moved one end: try just past it, on the other side
            # a hair inside the tolerance, so that rounding cannot leave the bracket just too wide
            probe = high * (1 - _CLOSE) if seen[-1][0] == high else low / (1 - _CLOSE)
        elif step == "aim":
            probe, aimed_from = _aim(seen, target_epsilon, low, high), high - low
        if probe is None:
            probe, step = (low + high) / 2, "bisect"
        seen.append((probe, epsilon(probe)))
        if seen[-1][1] > target_epsilon:
            low = probe
        else:
            high = probe
        # after an aim, close; bisect once after two aims in a row that did not quarter the
        # bracket (an aim and its close are two probes: bisection's quartering)
        if step == "aim":
            step = "close"
        elif step == "close" and high - low > aimed_from / 4:
            missed += 1
            step = "bisect" if missed == 2 else "aim"
        else:
            missed, step = 0, "aim"
    return high


def _aim(seen: list[tuple[float, float]], target: float, low: float, high: float) -> float | None:
    """Where the secant through the last two evaluations, in (log sigma, log epsilon), crosses
    the target, a third of the tolerance above it; None if that is not inside (low, high).

    Epsilon is close to a power of sigma, so near the answer this line is nearly exact. A probe
    aimed just above the answer becomes the new ``high``, and the probe after it,
    ``high * (1 - tol)``, lands below and closes the bracket: each probe costs an RDP vector per
    phase (0.05 to 0.12 s), and this typically takes half the probes of bisection (4 to 8
    instead of 10 to 12 on the plans of the tests). The caller bisects instead when there is no
    line (an epsilon of 0 or infinity) and after two aims in a row that did not quarter the
    bracket, so a function this line fits badly costs at most five probes per quartering."""
    if len(seen) < 2:
        return None
    (s1, e1), (s2, e2) = seen[-2], seen[-1]
    if s1 == s2 or not (0 < e1 < math.inf and 0 < e2 < math.inf) or e1 == e2:
        return None
    slope = (math.log(e2) - math.log(e1)) / (math.log(s2) - math.log(s1))
    exponent = math.log(s2) + (math.log(target) - math.log(e2)) / slope if slope else math.inf
    if not abs(exponent) < 700:  # a flat line: it crosses nowhere useful (and exp would overflow)
        return None
    probe = math.exp(exponent) * (1 + _SIGMA_RTOL / 3)
    return probe if low < probe < high else None


def _opacus_accountant(name: str) -> IAccountant:
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ValueError(f"unknown accountant {name!r}: choose one of {', '.join(ACCOUNTANTS)}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _contributing(history: Sequence[tuple[float, float, int] | SkellamRow]) -> tuple[History, list[SkellamRow]]:
    """The validated history as one row per distinct (sigma, q), steps summed, and one Skellam
    row per distinct (z, sensitivity).

    Composition is commutative, so T_1 steps and later T_2 steps of the same mechanism are
    that mechanism self-composed T_1 + T_2 times (Opacus' own ``step`` merges consecutive
    ones the same way). It keeps the PRV accountant's cost, which grows with the number of
    distinct rows, independent of the number of rounds. Rows without a step or a sampled
    example compose the identity and are dropped (PRV cannot discretise zero steps).
    """
    steps_by_mechanism: dict[tuple[float, float], int] = {}
    steps_by_skellam: dict[tuple[float, float], int] = {}
    for index, row in enumerate(history):
        sigma, q, steps = row[:3]
        if not (isinstance(steps, Integral) and not isinstance(steps, bool) and steps >= 0):
            raise ValueError(f"history row {index}: steps must be an integer >= 0, got {steps!r}")
        if not (isinstance(q, Real) and 0 <= q <= 1):
            raise ValueError(f"history row {index}: sample_rate must be in [0, 1], got {q!r}")
        if not (isinstance(sigma, Real) and sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(
                f"history row {index}: noise_multiplier must be finite and >= 0, got {sigma!r}"
            )
        if isinstance(row, SkellamRow):
            if q != 1 or not sigma > 0 or not (isinstance(row.sensitivity, Real) and row.sensitivity >= 1):
                raise ValueError(f"history row {index}: a Skellam row needs rate 1, a positive multiplier and "
                                 f"a sensitivity >= 1, got {tuple(row)!r}")
            if steps > 0:
                key = (float(sigma), float(row.sensitivity))
                steps_by_skellam[key] = steps_by_skellam.get(key, 0) + int(steps)
        elif steps > 0 and q > 0:
            key = (float(sigma), float(q))
            steps_by_mechanism[key] = steps_by_mechanism.get(key, 0) + int(steps)
    return ([(sigma, q, steps) for (sigma, q), steps in steps_by_mechanism.items()],
            [SkellamRow(z, 1.0, steps, d2) for (z, d2), steps in steps_by_skellam.items()])
