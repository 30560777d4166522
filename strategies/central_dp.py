"""Central (site-level) DP: Flower's server-side fixed clipping with its RDP accountant.

Each round the server clips every site's update to norm C, averages the m updates with
*equal* weights and adds Gaussian noise (Flower's ``DifferentialPrivacyServerSideFixedClipping``):

    Δ_i = clip_C(θ_i − θ),    θ' = θ + (1/m) Σ_i Δ_i + N(0, (z C / m)² I).

Adding or removing one site changes (1/m) Σ_i Δ_i by at most C/m, so one round is the
Gaussian mechanism with noise multiplier z. Rounds compose: Flower's ``RdpAccountant`` with
``NO_AMPLIFICATION`` (no credit for sampling sites, which Flower's sampling does not make
Poisson) gives the cumulative ε at ``central-dp-delta``; for T rounds that is the RDP bound
ε(α) = T α / (2 z²) converted to (ε, δ).

This protects *sites* (a whole site's data), on top of and independent of the example-level
DP-SGD each site runs. Flower's accountant, and the bound above, need:

- a plain mean: the wrapped strategy must use ``FedAvg.aggregate_train`` (FedAvg, FedProx).
  Median, trimmed mean, Krum and FedAdam/FedYogi have other sensitivities and are refused
  by ``strategies.factory``;
- equal weights: a mean weighted by example counts n_i / Σ n has sensitivity
  C · max_i n_i / Σ n > C / m, so the stated z would overstate the privacy. Every reply's
  weight is therefore set to 1 before aggregation;
- exactly m = ``num-sampled-clients`` updates: Flower refuses to configure a round that
  samples another number, and releases nothing when fewer than m valid updates came back
  (a site that failed, refused or was rejected by screening). Such a round fails with
  :class:`~strategies.screening.TooFewUpdates` and costs no privacy.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from strategies.screening import TooFewUpdates


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Server-side clipping + noise on an equally weighted FedAvg, with the spend accounted."""

    def __init__(self, strategy: FedAvg, noise_multiplier: float, clipping_norm: float, num_sampled_clients: int, delta: float) -> None:
        config = PrivacyConfig(
            target_delta=delta,
            # Without amplification the population size does not enter ε; it must only be >= m.
            population_size=num_sampled_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients, accountant=RdpAccountant(config))

    @property
    def epsilon(self) -> float:
        """Cumulative ε of all releases so far (0 before the first)."""
        return self.privacy_spent().epsilon

    def replay(self, releases: int) -> None:
        """Count ``releases`` rounds released before a resume: the accountant lives in memory."""
        if releases > 0:
            event = GaussianPrivacyEvent(
                noise_multiplier=self.noise_multiplier,
                sample_size=self.num_sampled_clients,
                population_size=self.num_sampled_clients,
            )
            self.accountant.compose(event, count=releases)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        weight_key = self.strategy.weighted_by_key
        for reply in replies:
            next(iter(reply.content.metric_records.values()))[weight_key] = 1
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            raise TooFewUpdates(
                f"round {server_round}: central DP needs exactly {self.num_sampled_clients} valid "
                f"updates, got {len(replies)}; nothing was released"
            )
        return arrays, metrics
