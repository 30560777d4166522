"""Site-level empirical privacy from random canary clients (Andrew, Kairouz, Oh, Oprea, McMahan,
Suriyakumar 2023, "One-shot Empirical Privacy Estimation for Federated Learning",
arXiv 2302.03098).

**The experiment.** Besides the real sites, k *canary clients* take part in every round: canary
j's update is a fixed random direction u_j, drawn uniformly from the unit sphere in R^d (d: the
number of values the aggregator averages), scaled to the norm a site's update may have. After
training, with Δ = θ_T − θ_0 the change of the global adapter over the run, each canary gets the
statistic

    c_j = cos(u_j, Δ) = ⟨u_j, Δ⟩ / ‖Δ‖.

**The null.** A direction u that took no part is independent of Δ, and for a uniform unit
vector the cosine with any fixed vector has the exact law

    (c + 1) / 2 ~ Beta((d − 1)/2, (d − 1)/2),    mean 0, variance 1/d,

which for d ≥ 1000 is N(0, 1/d) for every purpose here (Andrew et al., Sec. 4); the estimate
needs that many values (a LoRA adapter has tens of thousands). k more *unseen* directions, never
inserted, measure the null: ``null_consistent`` says whether their mean and spread agree with it.

**The estimate.** Under the Gaussian mechanism with every canary in every round, an inserted
canary's cosine is its share of the run's change plus the noise's projection on it, whose spread
is the null's: telling inserted from not inserted is telling N(μ, 1/d) from N(0, 1/d). So ε̂ is
the Gaussian mechanism's ε at δ for the shift μ̂ √d (μ̂ the inserted canaries' mean cosine, 0 if
negative), with a 95% bootstrap interval (the inserted cosines resampled, μ̂ recomputed). An
accountant's ε below the whole interval means the mechanism leaks more than it accounts for.
ε̂ is an *estimate*, not a bound, and below the accountant's ε it proves nothing stronger
(docs/privacy.md, "Measured epsilon").

Andrew et al. also fit the inserted cosines' own spread σ̂ and take the ε between N(0, 1/d) and
N(μ̂, σ̂²); that is reported too (``epsilon_fitted_spread``), without the alarm: at δ = 1e-5 the
ε of two normals of different spreads is decided by their far tails, where σ̂'s sampling error
(7% for 100 canaries) alone adds ε. For 100 canaries drawn from a correct mechanism at z = 5
over 4 rounds (exact ε 1.55), it came out at a median 2.7 over 30 draws, the shift's at 1.54
(``tests/test_canary_cosines.py``).

**ε between two distributions.** For P, Q with densities p, q, (ε, δ)-indistinguishability
holds when both hockey-stick divergences are at most δ:

    δ_{P‖Q}(ε) = sup_S P(S) − e^ε Q(S) = P(L > ε) − e^ε Q(L > ε),    L = log p/q.

For P = N(μ_p, σ_p²), Q = N(μ_q, σ_q²), L(x) − ε = a x² + b x + c with

    a = 1/(2σ_q²) − 1/(2σ_p²),    b = μ_p/σ_p² − μ_q/σ_q²,
    c = log(σ_q/σ_p) − μ_p²/(2σ_p²) + μ_q²/(2σ_q²) − ε,

so {L > ε} is a half-line (a = 0), the outside of the two roots (a > 0) or the inside (a < 0),
and both masses are normal cdfs. ε̂ is the least ε at which both divergences are ≤ δ
(monotone in ε: found by bisection, in log space so that ε in the thousands stays finite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

MIN_DIMENSION = 1000  # below, the null is not N(0, 1/d) closely enough


@dataclass(frozen=True)
class SiteLevelEstimate:
    epsilon: float  # ε̂ at ``delta``: the Gaussian mechanism's ε at the shift μ̂ √d
    epsilon_interval: tuple[float, float]  # its 95% bootstrap interval
    epsilon_fitted_spread: float  # Andrew et al.'s: N(0, 1/d) against N(μ̂, σ̂²)
    delta: float
    canaries: int  # inserted canary clients
    dimension: int  # d: the values the aggregator averages
    mean_cosine: float  # μ̂ of the inserted canaries
    std_cosine: float  # σ̂ of the inserted canaries
    null_std: float  # 1/√d, the std of the cosine of a direction that took no part
    unseen_mean_cosine: float  # the same statistics of never-inserted directions: the null, measured
    unseen_std_cosine: float
    null_consistent: bool  # their mean within 4 standard errors of 0, their std within 25% of 1/√d


def _log_mass(mean: float, std: float, intervals: list[tuple[float, float]]) -> float:
    """log N(mean, std²)((l₁, r₁) ∪ (l₂, r₂) ∪ …) for disjoint intervals."""
    logs = []
    for left, right in intervals:
        # log(Φ(r) − Φ(l)) on the side of the mean where both tails are representable.
        if left > mean:
            upper, lower = stats.norm.logsf(left, mean, std), stats.norm.logsf(right, mean, std)
        else:
            upper, lower = stats.norm.logcdf(right, mean, std), stats.norm.logcdf(left, mean, std)
        logs.append(upper + np.log1p(-np.exp(lower - upper)) if lower < upper else -np.inf)
    return float(special.logsumexp(logs)) if logs else -np.inf


def _privacy_loss_above(p: tuple[float, float], q: tuple[float, float], epsilon: float) -> list[tuple[float, float]]:
    """The set {x : log p(x)/q(x) > ε} of two normals p = (mean, std), q = (mean, std), as intervals."""
    (mp, sp), (mq, sq) = p, q
    a = 0.5 / sq**2 - 0.5 / sp**2
    b = mp / sp**2 - mq / sq**2
    c = math.log(sq / sp) - 0.5 * (mp / sp) ** 2 + 0.5 * (mq / sq) ** 2 - epsilon
    inf = math.inf
    if abs(a) < 1e-12 * max(abs(b), 1.0):
        if b == 0:
            return [(-inf, inf)] if c > 0 else []
        root = -c / b
        return [(root, inf)] if b > 0 else [(-inf, root)]
    discriminant = b * b - 4 * a * c
    if discriminant <= 0:
        return [(-inf, inf)] if a > 0 else []
    r1, r2 = sorted(((-b - math.sqrt(discriminant)) / (2 * a), (-b + math.sqrt(discriminant)) / (2 * a)))
    return [(-inf, r1), (r2, inf)] if a > 0 else [(r1, r2)]


def log_hockey_stick(p: tuple[float, float], q: tuple[float, float], epsilon: float) -> float:
    """log δ_{P‖Q}(ε) = log(P(L > ε) − e^ε Q(L > ε)) for normals P, Q; −inf when it is 0."""
    region = _privacy_loss_above(p, q, epsilon)
    log_p, log_q = _log_mass(*p, region), _log_mass(*q, region)
    if log_p == -np.inf or epsilon + log_q >= log_p:
        return -np.inf
    return log_p + math.log1p(-math.exp(epsilon + log_q - log_p))


def epsilon_between_gaussians(p: tuple[float, float], q: tuple[float, float], delta: float) -> float:
    """The least ε ≥ 0 with δ_{P‖Q}(ε) ≤ δ and δ_{Q‖P}(ε) ≤ δ, for normals given as (mean, std)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if min(p[1], q[1]) <= 0:
        raise ValueError("both standard deviations must be positive")
    log_delta = math.log(delta)

    def excess(epsilon: float) -> float:
        worst = max(log_hockey_stick(p, q, epsilon), log_hockey_stick(q, p, epsilon))
        return max(worst, -1e6) - log_delta

    if excess(0.0) <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while excess(high) > 0:
        low, high = high, high * 2
    return float(optimize.brentq(excess, low, high, xtol=1e-9, rtol=1e-9))


def _shift_epsilon(mean: float, dimension: int, delta: float) -> float:
    null_std = dimension ** -0.5
    return epsilon_between_gaussians((0.0, null_std), (max(mean, 0.0), null_std), delta)


def estimate_epsilon(
    seen: np.ndarray, unseen: np.ndarray, dimension: int, delta: float, resamples: int = 200,
) -> SiteLevelEstimate:
    """ε̂ from the cosines of inserted (``seen``) and never-inserted (``unseen``) canaries, with
    its 95% bootstrap interval over ``resamples`` resamplings of ``seen``."""
    seen, unseen = np.asarray(seen, dtype=float), np.asarray(unseen, dtype=float)
    if seen.size < 2 or unseen.size < 2:
        raise ValueError("the site-level estimate needs at least 2 inserted and 2 unseen canary clients")
    if dimension < MIN_DIMENSION:
        raise ValueError(f"the site-level estimate needs at least {MIN_DIMENSION} adapter values, got {dimension}")
    null_std = dimension ** -0.5
    # The resampling hides nothing (the cosines are the auditor's own): a fixed generator makes
    # the interval reproducible.
    rng = np.random.default_rng(0)
    means = rng.choice(seen, (resamples, seen.size)).mean(axis=1)
    # ε̂ grows with the shift, so its percentiles are those of the resampled means.
    low, high = (_shift_epsilon(m, dimension, delta) for m in np.percentile(means, [2.5, 97.5], method="lower"))
    spread = float(seen.std(ddof=1))
    fitted = epsilon_between_gaussians((0.0, null_std), (float(seen.mean()), spread), delta) if spread > 0 else math.inf
    unseen_mean, unseen_std = float(unseen.mean()), float(unseen.std(ddof=1))
    return SiteLevelEstimate(
        epsilon=_shift_epsilon(float(seen.mean()), dimension, delta), epsilon_interval=(float(low), float(high)),
        epsilon_fitted_spread=fitted, delta=delta, canaries=int(seen.size), dimension=dimension,
        mean_cosine=float(seen.mean()), std_cosine=spread, null_std=null_std,
        unseen_mean_cosine=unseen_mean, unseen_std_cosine=unseen_std,
        null_consistent=bool(abs(unseen_mean) < 4 * null_std / math.sqrt(unseen.size)
                             and 0.75 < unseen_std / null_std < 1.25),
    )
