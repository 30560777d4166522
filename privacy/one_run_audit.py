"""Lower bounds on epsilon from one training run with canaries: the statistics of an empirical
privacy audit.

**The experiment** (Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1) Training
Run", arXiv 2305.08846). m canaries are each included in the training data independently with
probability 1/2; the inclusion bits stay secret. After training, every canary gets a score
(higher: more likely included). The auditor guesses "included" for the k highest scores, and
either abstains on the rest or also guesses "excluded" for the k lowest; of its r guesses (k or
2k), v are correct. The theorems below hold for any such guesses made from the scores alone.

**Pure-DP bound.** If training is (epsilon, 0)-DP, the number of correct guesses is
stochastically dominated by Binomial(r, q), q = e^epsilon / (1 + e^epsilon) (their Theorem 3.1).
So the p-value of "epsilon or less" given v correct is

    beta(epsilon) = P[Binomial(r, q) >= v].

**With delta** (their Theorem 3.3), the p-value grows by 2 m delta alpha, where

    alpha = max over i = 1..v of (P[Binomial(r, q) >= v - i] - beta) / i.

The lower bound at confidence 1 - a is the largest epsilon whose p-value is at most a: an
(epsilon', delta) claim for any smaller epsilon' is rejected at that level.

**f-DP bound** (Mahloujifar, Melis and Chaudhuri 2024, "Auditing f-Differential Privacy in One
Run", arXiv 2410.22235). The same experiment, read against the trade-off curve of a Gaussian
mechanism whose (epsilon, delta) is the claim: mu = 1 / sigma(epsilon, delta), and the inverse
blow-up of the curve is x -> Phi(Phi^-1(x) - mu). Their recursion bounds how many correct (r)
and wrong (h) guesses, each as a share of m, the claim allows at significance a:

    r = a v / m,  h = a (k - v) / m
    for i = v - 1 down to 0:   h' = max(h, blow_up_inverse(r)),
                               r  = min(r + i / (k - i) (h' - h), 1),  h = h'

and the claim is rejected when r + h exceeds k / m. For Gaussian noise (DP-SGD) this is much closer to
the truth than the pure-DP bound.

**Choosing k.** The auditor tries every k in a grid, one-sided and two-sided, and keeps the best
bound; each try is one more test, so the significance is split among them (Bonferroni), which
keeps the reported bound valid at the stated confidence. Tied scores are ranked in a fixed
random order, never by whether a canary was included.

A lower bound well below the accountant's upper bound is expected: the canaries, the score and a
single run see only part of what an adversary could do. It proves nothing stronger than "at
least this much"; a bound above the upper bound would mean a bug in the DP implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from dp_accounting import get_sigma_gaussian
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import binom, norm

METHODS = ("one-run", "one-run-fdp")


@dataclass(frozen=True)
class AuditBound:
    epsilon: float  # the lower bound, 0 when nothing is rejected
    method: str
    confidence: float
    canaries: int
    guesses: int  # the top k guessed "included" (and, two-sided, the bottom k "excluded")
    correct: int
    two_sided: bool = False


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability, under an (epsilon, delta)-DP training, of ``correct`` or more correct
    guesses out of ``guesses`` among ``m`` canaries (Steinke et al. 2023, Theorems 3.1, 3.3)."""
    q = float(expit(epsilon))
    beta = float(binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return beta
    shifts = np.arange(1, correct + 1)
    alpha = float(np.max((binom.sf(correct - shifts - 1, guesses, q) - beta) / shifts))
    return min(1.0, beta + 2 * m * delta * max(alpha, 0.0))


def epsilon_one_run(m: int, guesses: int, correct: int, significance: float, delta: float) -> float:
    """The largest epsilon rejected by :func:`p_value` at ``significance`` (0 if none is)."""
    return _largest_rejected(lambda eps: significance - p_value(m, guesses, correct, eps, delta))


@lru_cache(maxsize=512)
def _gaussian_mu(epsilon: float, delta: float) -> float:
    sigma = get_sigma_gaussian(epsilon, delta)
    return math.inf if sigma == 0 else 1.0 / sigma


def epsilon_one_run_fdp(m: int, guesses: int, correct: int, significance: float, delta: float) -> float:
    """The largest (epsilon, delta) of a Gaussian mechanism that the f-DP audit rejects."""

    def falsified(epsilon: float) -> float:
        mu = _gaussian_mu(epsilon, delta)
        inverse = (lambda x: float(x >= 1.0)) if math.isinf(mu) else (lambda x: float(norm.cdf(norm.ppf(x) - mu)))
        r, h = significance * correct / m, significance * (guesses - correct) / m
        for i in range(correct - 1, -1, -1):
            widened = max(h, inverse(r))
            if widened == h:
                break  # neither r nor h can change again
            r, h = min(r + i / (guesses - i) * (widened - h), 1.0), widened
        return r + h - guesses / m

    return _largest_rejected(falsified)


def _largest_rejected(rejects: Callable[[float], float]) -> float:
    """The root of ``rejects`` (positive: the claim at that epsilon is rejected), found by
    doubling then bisection; 0 when even epsilon = 0 stands."""
    if rejects(0.0) <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while rejects(high) > 0:
        low, high = high, high * 2
        if high > 1e3:
            return math.inf
    return float(brentq(rejects, low, high, xtol=1e-6))


def audit(
    included_scores: Sequence[float],
    excluded_scores: Sequence[float],
    confidence: float = 0.95,
    delta: float = 1e-5,
    method: str = "one-run",
    guess_counts: Sequence[int] | None = None,
) -> AuditBound:
    """The best lower bound over the guess counts ``guess_counts`` (default: a grid of about
    20 from 1 to m/2), one- and two-sided, Bonferroni-corrected, from the scores of the
    included and excluded canaries."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    scores = np.concatenate([np.asarray(included_scores, float), np.asarray(excluded_scores, float)])
    truth = np.concatenate([np.ones(len(included_scores), bool), np.zeros(len(excluded_scores), bool)])
    m = len(scores)
    if m == 0 or not np.all(np.isfinite(scores)):
        raise ValueError("the audit needs at least one canary, and finite scores")
    # Ties in a fixed random order: the input lists the included canaries first.
    shuffled = np.random.default_rng(0).permutation(m)
    ranked = truth[shuffled][np.argsort(-scores[shuffled], kind="stable")]
    grid = guess_counts or np.unique(np.geomspace(1, max(1, m // 2), num=20).round().astype(int)).tolist()
    counts = sorted({int(k) for k in grid if 1 <= k <= m // 2 or (k == m == 1)})
    tries = [(k, two_sided) for k in counts for two_sided in (False, True)]
    significance = (1 - confidence) / len(tries)
    bound = epsilon_one_run_fdp if method == "one-run-fdp" else epsilon_one_run
    best = AuditBound(0.0, method, confidence, m, 0, 0)
    for k, two_sided in tries:
        correct = int(ranked[:k].sum()) + (int((~ranked[m - k:]).sum()) if two_sided else 0)
        guesses = 2 * k if two_sided else k
        epsilon = bound(m, guesses, correct, significance, delta)
        if epsilon > best.epsilon:
            best = AuditBound(epsilon, method, confidence, m, guesses, correct, two_sided)
    return best
