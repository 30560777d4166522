"""A site's training plan for a run: its schedule of phases, and under DP what each round will
cost, known before anyone trains.

**Schedule.** A run of R rounds has up to two phases (:func:`choose_schedule`):

    probe       rounds 1..P      the classification head alone, on features of the frozen
                                 encoder computed once per site (``client.probe``): a DP-SGD
                                 step there costs a matrix product, so this phase takes
                                 hundreds of steps
    fine-tune   rounds P+1..R    LoRA and the head, through the whole model

(P = ``probe-rounds``; 0 for causal-lm, whose model has no head to probe). This is LP-FT
(Kumar et al. 2022): fine-tuning starts from a head that already fits the features, so the
first noisy LoRA steps are not spent undoing a random head. Under DP it is where most of the
signal comes from: a linear probe on good features is strong under DP (Tramer and Boneh 2021),
and it can take many steps at a small sampling rate, the regime DP-SGD needs (Yu et al. 2021).

Each phase has an expected batch b (Poisson rate q = b / N, N the site's public number of
training units), T steps per round and a learning rate. A value set in the run config wins;
``0`` means choose it here, from N alone (public), as follows:

    probe       b = clamp(N / 8, 8, 64)            T = ceil(PROBE_STEPS / P)            lr = 0.03
    fine-tune   b = clamp(N / 4, 16, 128)  (DP)    T = min(E ceil(N / b), 100)          lr = 0.005
                b = min(32, N)          (no DP)    E = 1 (DP), 3 (no DP)

(E: ``local-epochs``; the cap of 100 steps applies only to the planned E: a site far larger
than the others, or one site alone, otherwise takes hundreds of Adam steps per round at this
rate and drifts off: FPB centralised, 291 steps a round, fell from 0.77 to 0.61 in round 3.) The constants were tuned on the generated clinical corpus and on a split
of FPB's train.csv, never on its test.csv (``docs/benchmarks.md``). A larger DP batch lowers
the noise on the mean gradient, sigma C / b, at the same epsilon. Under DP the fine-tune phase
gets one epoch per round: on FPB more DP fine-tuning (2 epochs of batch 256) scored lower on
the tuning split, while without DP three epochs scored higher than one.

**Privacy.** Each round a DP site runs, in order,

    DP-SGD          T steps of the subsampled Gaussian, rate q of the round's phase, noise sigma
    train loss      one subsampled Gaussian release, rate q, noise sigma_m   (report-metrics = noised)
    evaluation      one Gaussian release, rate 1, noise sigma_m              (report-metrics = noised)

so after r rounds it has composed those mechanisms r times, and its epsilon at delta is the RDP
bound of :func:`privacy.accountant.epsilon_for`. One sigma serves both phases: given
(``noise-multiplier``) or the smallest one (to 0.1 %) that keeps all R rounds, releases
included, within ``target-epsilon``; either way it is raised to the site's
``min-noise-multiplier``. ``fedlora privacy plan`` prints this per site; a site trains with
exactly the plan computed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlora.run_config import RunSettings
from privacy.accountant import History, calibrate_noise, epsilon_for
from privacy.budget import EffectiveDP
from privacy.distributed_dp import Shares
from privacy.skellam import SkellamRow

ACCOUNTANT = "rdp"
PROBE, FINE_TUNE = "probe", "fine-tune"
PROBE_STEPS = 300
PROBE_LEARNING_RATE = 0.03
FINE_TUNE_LEARNING_RATE = 0.005
FINE_TUNE_EPOCHS = {True: 1, False: 3}  # by whether DP is on
MAX_PLANNED_STEPS = 100


@dataclass(frozen=True)
class Phase:
    name: str  # PROBE or FINE_TUNE
    first_round: int
    last_round: int
    batch_size: int  # expected batch: Poisson rate q = batch_size / N under DP
    sample_rate: float
    steps_per_round: int
    learning_rate: float

    @property
    def rounds(self) -> int:
        return self.last_round - self.first_round + 1

    def releases(self, release_sigma: float | None, rounds: int) -> History:
        """The metric releases of ``rounds`` of this phase's rounds (none when ``release_sigma``
        is None: report-metrics = none)."""
        if release_sigma is None or rounds == 0:
            return []
        return [(release_sigma, self.sample_rate, rounds), (release_sigma, 1.0, rounds)]


@dataclass(frozen=True)
class SitePlan:
    phases: tuple[Phase, ...]
    noise_multiplier: float
    release_noise_multiplier: float | None  # None: report-metrics = none
    epsilon_after_round: tuple[float, ...]


def phase_of(phases: tuple[Phase, ...], server_round: int) -> Phase:
    """The phase a round belongs to; a round past the planned ones (a resumed run given more
    rounds) continues the last phase."""
    for phase in phases:
        if server_round <= phase.last_round:
            return phase
    return phases[-1]


def public_population(declared: int, eval_fraction: float, held_out: bool = False) -> int:
    """N: a site's declared units times their training (or held-out) share. Rates and released
    means divide by it, never by a count of rows the run's settings leave usable."""
    return max(1, round(declared * (eval_fraction if held_out else 1 - eval_fraction)))


def choose_schedule(settings: RunSettings, population: int, private: bool) -> tuple[Phase, ...]:
    """The phases of a run for a site of ``population`` training units (see the module doc)."""
    rounds, given = settings.num_server_rounds, settings.schedule
    probe_rounds = settings.probe_rounds
    phases = []
    if probe_rounds:
        batch = given.probe_batch_size or _clamp(population // 8, 8, 64)
        steps = given.probe_steps or math.ceil(PROBE_STEPS / probe_rounds)
        rate = given.probe_learning_rate or PROBE_LEARNING_RATE
        phases.append(Phase(PROBE, 1, probe_rounds, batch, _rate(batch, population), steps, rate))
    if probe_rounds < rounds or not phases:
        default_batch = _clamp(population // 4, 16, 128) if private else min(32, population)
        batch = given.batch_size or default_batch
        epochs = given.local_epochs
        planned = (epochs or FINE_TUNE_EPOCHS[private]) * math.ceil(population / batch)
        steps = given.local_steps or (planned if epochs else min(planned, MAX_PLANNED_STEPS))
        rate = given.learning_rate or FINE_TUNE_LEARNING_RATE
        phases.append(Phase(FINE_TUNE, probe_rounds + 1, max(rounds, probe_rounds + 1), batch, _rate(batch, population), steps, rate))
    return tuple(phases)


def plan_run(dp: EffectiveDP, phases: tuple[Phase, ...], release_sigma: float | None) -> SitePlan:
    """The privacy plan of an enabled ``dp`` over the rounds of ``phases``."""
    releases = [row for phase in phases for row in phase.releases(release_sigma, phase.rounds)]
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        sigma = calibrate_noise(
            dp.target_epsilon, dp.delta, [(p.sample_rate, p.rounds * p.steps_per_round) for p in phases],
            ACCOUNTANT, prior=releases,
        )
    sigma = dp.at_least_the_floor(sigma)
    last = phases[-1].last_round
    after = tuple(
        epsilon_for(_history(phases, sigma, release_sigma, r), dp.delta, ACCOUNTANT) for r in range(1, last + 1)
    )
    return SitePlan(phases, sigma, release_sigma, after)


def public_noise_multiplier(settings: RunSettings, sensitivity: float) -> float:
    """z_run, the multiplier the run asks of every secure sum: ``noise-multiplier``, or the
    smallest that keeps the run's rounds of Skellam releases alone within ``target-epsilon`` at
    the run's ``delta``. From public values only, so every site computes the same one and every
    site's share is at least the same public size (``privacy.distributed_dp.Shares``)."""
    if settings.dp.noise_multiplier:
        return settings.dp.noise_multiplier
    return calibrate_noise(settings.dp.target_epsilon, settings.dp.delta, [(1.0, settings.num_server_rounds)],
                           ACCOUNTANT, skellam_sensitivity=sensitivity)


def plan_distributed(dp: EffectiveDP, phases: tuple[Phase, ...], release_sigma: float | None,
                     shares: Shares) -> tuple[SitePlan, float]:
    """The privacy plan of distributed DP (``client.distributed_site``) and the variance of this
    site's own share. Every round is one Skellam release on all units (rate 1) at sensitivity D2.
    The site needs multiplier z_need: the run's, or calibrated to its own target over all the
    run's rounds and releases. It counts on its own share O and, from the others, only the
    public size P each adds at least (``shares.counted``), so it adds
    O = max(P, z_need^2 D2^2 - others P, (floor D2)^2): at least its part, more where its own
    target asks for it, and never less than its ``min-noise-multiplier`` alone (the server sets
    how many shares a sum is assumed to hold, so it must not set how little noise one carries).
    The plan's z is sqrt(O + others P) / D2, the noise the site can count on."""
    releases = [row for phase in phases for row in phase.releases(release_sigma, phase.rounds)]
    last, d2 = phases[-1].last_round, shares.sensitivity
    need = dp.noise_multiplier or calibrate_noise(dp.target_epsilon, dp.delta, [(1.0, last)], ACCOUNTANT,
                                                  prior=releases, skellam_sensitivity=d2)
    own = max(shares.public_variance, (need * d2) ** 2 - shares.counted_others * shares.public_variance,
              (dp.min_noise_multiplier * d2) ** 2)
    z = shares.noise_multiplier(own)
    after = []
    for through in range(1, last + 1):
        history: History = [SkellamRow(z, 1.0, through, d2)]
        for phase in phases:
            history += phase.releases(release_sigma, max(0, min(phase.last_round, through) - phase.first_round + 1))
        after.append(epsilon_for(history, dp.delta, ACCOUNTANT))
    return SitePlan(phases, z, release_sigma, tuple(after)), own


def _history(phases: tuple[Phase, ...], sigma: float, release_sigma: float | None, through_round: int) -> History:
    """Every mechanism of rounds 1..``through_round``."""
    history: History = []
    for phase in phases:
        rounds = max(0, min(phase.last_round, through_round) - phase.first_round + 1)
        if rounds:
            history.append((sigma, phase.sample_rate, rounds * phase.steps_per_round))
            history += phase.releases(release_sigma, rounds)
    return history


def _rate(batch: int, population: int) -> float:
    return min(1.0, batch / population)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))
