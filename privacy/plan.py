"""A site's DP plan for a run: what each round will cost, known before anyone trains.

Each of the run's R rounds a site runs, in order,

    DP-SGD          T steps of the subsampled Gaussian, rate q = b / N, noise sigma
    train loss      one subsampled Gaussian release, rate q, noise sigma_m   (report-metrics = noised)
    evaluation      one Gaussian release, rate 1, noise sigma_m              (report-metrics = noised)

with b the batch size, N the site's declared training units and T its planned steps (local
steps, or epochs x ceil(N / b)). After r rounds the site has composed

    r x (q, sigma, T)  +  r x (q, sigma_m, 1)  +  r x (1, sigma_m, 1)

and its epsilon at delta is the RDP bound of :func:`privacy.accountant.epsilon_for`. sigma is
given (``noise-multiplier``) or the smallest one (to 0.1 %) that keeps all R rounds, releases
included, within ``target-epsilon``; either way it is raised to the site's
``min-noise-multiplier``. ``fedlora privacy plan`` prints this per site; a site trains with
exactly the sigma computed here.
"""

from __future__ import annotations

from dataclasses import dataclass

from privacy.accountant import History, calibrate_noise, epsilon_for
from privacy.budget import EffectiveDP

ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class SitePlan:
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    release_noise_multiplier: float | None  # None: report-metrics = none
    epsilon_after_round: tuple[float, ...]


def public_population(declared: int, eval_fraction: float, held_out: bool = False) -> int:
    """N: a site's declared units times their training (or held-out) share. Rates and released
    means divide by it, never by a count of rows the run's settings leave usable."""
    return max(1, round(declared * (eval_fraction if held_out else 1 - eval_fraction)))


def releases(release_sigma: float | None, sample_rate: float, rounds: int) -> History:
    """The metric releases of ``rounds`` rounds (none when ``release_sigma`` is None)."""
    if release_sigma is None or rounds == 0:
        return []
    return [(release_sigma, sample_rate, rounds), (release_sigma, 1.0, rounds)]


def plan_run(
    dp: EffectiveDP, sample_rate: float, steps: int, rounds: int, release_sigma: float | None
) -> SitePlan:
    """The plan of an enabled ``dp`` for ``rounds`` rounds of ``steps`` steps at ``sample_rate``."""
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        sigma = calibrate_noise(
            dp.target_epsilon, dp.delta, sample_rate, rounds * steps, ACCOUNTANT,
            prior=releases(release_sigma, sample_rate, rounds),
        )
    sigma = dp.at_least_the_floor(sigma)
    after = tuple(
        epsilon_for([(sigma, sample_rate, r * steps)] + releases(release_sigma, sample_rate, r), dp.delta, ACCOUNTANT)
        for r in range(1, rounds + 1)
    )
    return SitePlan(sample_rate, steps, sigma, release_sigma, after)
