"""Central (site-level) DP: Flower's server-side fixed clipping with its RDP accountant.

Each round the server clips every site's update to norm C, averages the m updates with
*equal* weights and adds Gaussian noise (Flower's ``DifferentialPrivacyServerSideFixedClipping``):

    Δ_i = clip_C(θ_i − θ),    θ' = θ + (1/m) Σ_i Δ_i + N(0, (z C / m)² I).

**Adjacency and sensitivity.** Two rounds are neighbours when one site's clipped update Δ_j is
replaced by zero and everything else, the denominator m included, stays ("zero-out", the
``REPLACE_SPECIAL`` relation of dp_accounting; Kairouz et al. 2021, arXiv:2103.00039, Def. 1.1).
The sum then equals the sum without site j, so this is adding or removing one site's update
with the denominator fixed at m. Since ‖Δ_j‖ ≤ C the released mean moves by at most

    ‖(1/m) Σ_i Δ_i − (1/m) Σ_{i≠j} Δ_i‖ = ‖Δ_j‖ / m ≤ C / m,

the L2 sensitivity. Noise of std z C / m makes one round the Gaussian mechanism with noise
multiplier z: RDP ε(α) = α / (2 z²). Under replace-one (substitution) adjacency, Δ_j swapped for
any Δ_j', the mean moves by ‖Δ_j − Δ_j'‖ / m ≤ 2C / m, so the same noise gives only the
guarantee of multiplier z / 2 (ε(α) = 2α / z²); fedlora claims no replace-one guarantee.

Flower agrees with this by construction: its ``PrivacyConfig`` accepts ``NO_AMPLIFICATION`` only
with ``NeighboringRelation.ADD_OR_REMOVE_ONE``, and its ``RdpAccountant`` composes a bare
``GaussianDpEvent(z)``, for which dp_accounting computes α / (2 z²) whatever the relation: the
relation is a label, and z must be the ratio of noise std to sensitivity under it, here
(z C / m) / (C / m). Zero-out and add/remove with a fixed denominator give the same ε.

What is *not* covered is whether a round releases at all. Flower releases only when exactly m
valid updates arrive, and the norm screen (``strategies.norm_screen``) rejects a site that sent the
global adapter back unchanged (‖Δ_j‖ = 0: Flower's clipping divides by it; for a site running
DP-SGD, whose update carries Gaussian noise, that has probability zero). Such a round fails with
:class:`~strategies.screening.TooFewUpdates` and releases nothing, so a sampled site that is
absent (failed, refused, rejected by screening) or sends nothing new is visible, and
participation is recorded openly in the history. What the noise hides is the *content* of a
site's update: any two rounds that differ only in site j's clipped update, with
‖Δ_j − Δ_j'‖ ≤ C (Δ_j' = 0 in the limit), are covered at multiplier z.

**Composition.** Rounds compose over the releases: T rounds at multipliers z_1 … z_T give
ε(α) = Σ_t α / (2 z_t²), converted to (ε, δ) at ``central-dp-delta``. No credit is taken for
sampling sites (``NO_AMPLIFICATION``: Flower's sampling is not Poisson). The accountant lives
in memory, so a resumed run replays every earlier release at the multiplier it was made with
(:meth:`CentralDP.replay`, from each history record's ``central_dp``).

This protects *sites* (a whole site's data), on top of and independent of the example-level
DP-SGD each site runs. Flower's accountant, and the bound above, need:

- a plain mean: the wrapped strategy must use ``FedAvg.aggregate_train`` (FedAvg, FedProx).
  Median, trimmed mean, Krum and FedAdam/FedYogi have other sensitivities and are refused
  by ``strategies.factory``;
- equal weights: a mean weighted by example counts n_i / Σ n has sensitivity
  C · max_i n_i / Σ n > C / m, so the stated z would overstate the privacy. Every reply's
  weight is therefore set to 1 before aggregation;
- exactly m = ``num-sampled-clients`` updates: Flower refuses to configure a round that
  samples another number, and releases nothing when fewer than m valid updates came back.
  Such a round fails with :class:`~strategies.screening.TooFewUpdates` and costs no privacy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from strategies.validation import TooFewUpdates


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Server-side clipping + noise on an equally weighted FedAvg, with the spend accounted.

    ``round_release`` is what the round being aggregated released: None until its
    ``aggregate_train`` succeeds, then :meth:`settings`.
    """

    def __init__(self, strategy: FedAvg, noise_multiplier: float, clipping_norm: float, num_sampled_clients: int, delta: float) -> None:
        config = PrivacyConfig(
            target_delta=delta,
            # Without amplification the population size does not enter ε; it must only be >= m.
            population_size=num_sampled_clients,
            # The only relation Flower pairs with NO_AMPLIFICATION; with the denominator fixed at
            # m it is zero-out adjacency (module docstring): sensitivity C/m, noise z C/m.
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients, accountant=RdpAccountant(config))
        self.round_release: dict[str, float | int] | None = None

    @property
    def epsilon(self) -> float:
        """Cumulative ε of all releases so far (0 before the first)."""
        return self.privacy_spent().epsilon

    def settings(self) -> dict[str, float | int]:
        """What one release uses: noise std ``noise_multiplier`` · ``clipping_norm`` /
        ``num_sampled_clients``, accounted at ``delta``."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "num_sampled_clients": self.num_sampled_clients,
            "delta": self.accountant.config.target_delta,
        }

    def replay(self, releases: Iterable[Mapping[str, Any]]) -> None:
        """Compose releases made before a resume, each at the ``noise_multiplier`` it recorded.

        A release's RDP α / (2 z²) depends on its z alone: its own C and m set both the noise
        std z C / m and the sensitivity C / m, and without amplification the event's sizes are
        bookkeeping. RDP composes independently of δ, so the cumulative ε is reported at this
        run's ``central-dp-delta``.
        """
        population = self.accountant.config.population_size
        for release in releases:
            event = GaussianPrivacyEvent(
                noise_multiplier=float(release["noise_multiplier"]),
                sample_size=population,
                population_size=population,
            )
            self.accountant.compose(event)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.round_release = None
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        weight_key = self.strategy.weighted_by_key
        for reply in replies:
            next(iter(reply.content.metric_records.values()))[weight_key] = 1
        # No reply here has ‖Δ‖ = 0 (Flower's clipping divides by it): the norm screen outside
        # rejects an unchanged adapter before this wrapper sees it.
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            raise TooFewUpdates(
                f"round {server_round}: central DP needs exactly {self.num_sampled_clients} valid "
                f"updates, got {len(replies)}; nothing was released"
            )
        self.round_release = self.settings()
        return arrays, metrics
