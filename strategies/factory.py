"""The ``strategy`` run-config key -> a screened Flower strategy.

| strategy | Flower class (keys) | when to use it |
|---|---|---|
| ``fedavg`` (default) | ``FedAvg`` | IID-ish sites, no or light DP: the mean of the adapters weighted by example counts. |
| ``fedprox`` | ``FedProx`` (``proximal-mu``) | non-IID sites whose local training drifts apart: each site adds (μ/2)‖w − w_global‖² over the adapter to its local loss. |
| ``fedadam`` | ``FedAdam`` (``server-learning-rate``, ``server-tau``) | slow or noisy progress over many rounds: Adam on the server, applied to the mean update. |
| ``fedyogi`` | ``FedYogi`` (same keys) | as ``fedadam``, with Yogi's slower-growing second moment: more stable under noisy (DP) or sparse updates. |
| ``trimmed-mean`` | ``FedTrimmedAvg`` (``trim-beta``) | a few sites may send outliers (broken data, bugs): per coordinate, drop the ``trim-beta`` fraction at each end, average the rest. |
| ``median`` | ``FedMedian`` | as ``trimmed-mean``, stronger: the per-coordinate median tolerates up to half the sites being bad. |
| ``krum`` | ``Krum`` / ``MultiKrum`` (``krum-byzantine``, ``krum-select``) | up to f = ``krum-byzantine`` adversarial sites (needs n > 2f + 2): keep the ``krum-select`` updates closest to their n − f − 2 nearest neighbours. |
| ``ffa-lora`` | ``FedAvg`` on B (``strategies.ffa_lora``) | DP and/or non-IID sites: A stays at its seeded value, only B (+ head) trains and is sent; the mean is exact and uploads halve. |
| ``ffa-lora+NAME`` | NAME's class on B | FFA-LoRA with another aggregation of B, e.g. ``ffa-lora+median``; NAME is any row above except ``ffa-lora``. |
| ``hetlora`` | ``HetLoRA`` (``strategies.hetlora``) | sites of different compute: each sets ``lora-rank`` (<= the run's) in its node config; zero-padded rank-aware mean. |

Robust aggregators (``trimmed-mean``, ``median``, ``krum``) ignore example counts for the
adapter (one site, one vote); training metrics stay weighted means.

Every strategy is wrapped in :class:`ScreenedStrategy`: replies that are malformed or non-finite,
that change nothing, or whose distance from the global adapter is over ``update-norm-ratio`` (10)
times the median of the round's other updates or over ``max-update-norm`` (when set) are left out
before aggregation (``strategies.norm_screen``).

``central-dp = true`` adds site-level DP (``strategies.central_dp``): Flower's
``DifferentialPrivacyServerSideFixedClipping`` (``central-dp-noise-multiplier``,
``central-dp-clipping-norm``) around the plain-mean strategies only (``fedavg``, ``fedprox``,
``ffa-lora``, ``ffa-lora+fedprox``), with exactly ``num-sampled-clients`` sites per round; the
cumulative ε at ``central-dp-delta`` goes into every history record (``central_epsilon``), with
what the round's release used (``central_dp``: noise multiplier, clipping norm, number of sites,
δ; null when nothing was released), from which a resumed run replays the earlier spend.

``secure-aggregation = true`` (SecAgg+, ``server.secure_aggregation``) hands the server only the
weighted mean of a round's updates: it works with the plain means (``fedavg``, ``fedprox``,
``ffa-lora``, ``ffa-lora+fedprox``) and fp32 uploads (it quantizes them itself), and is refused
with any strategy that needs each update (the robust ones, server-side optimizers, HetLoRA) and
with central DP (which clips each update at the server). The size screen cannot see one update
there either: each weighted update is clipped per value to ``secagg-clipping-range`` before
masking, and an honest site bounds its own update's L2 norm to ``max-update-norm`` when set.

Layers, outermost first: screening, then FFA-LoRA's A handling, then central DP, then the
aggregator, so that validation sees the whole reply and DP clips and noises exactly the tensors
the aggregator averages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedlora.run_config import ConfigError, RunSettings, StrategySettings
from fedlora.secagg_grid import is_power_of_two
from strategies.central_dp import CentralDP
from strategies.ffa_lora import FreezeA, ffa_upload
from strategies.hetlora import HetLoRA
from strategies.norm_screen import NormScreen
from strategies.screening import ScreenedStrategy

FFA_LORA = "ffa-lora"
AGGREGATORS = ("fedavg", "fedprox", "fedadam", "fedyogi", "trimmed-mean", "median", "krum")
STRATEGIES = (*AGGREGATORS, FFA_LORA, *(f"{FFA_LORA}+{name}" for name in AGGREGATORS), "hetlora")
# Central DP's noise is calibrated to the sensitivity C/m of a plain mean (strategies.central_dp).
_PLAIN_MEAN = ("fedavg", "fedprox")


def _aggregator_name(given: StrategySettings) -> str:
    return (given.strategy.partition("+")[2] or "fedavg") if given.freezes_lora_a else given.strategy


def averages_plainly(given: StrategySettings) -> bool:
    """True when the run's aggregate is a plain mean of the site updates (``fedavg``, ``fedprox``,
    with or without FFA-LoRA): what central DP and the site-level audit's canary clients need."""
    return _aggregator_name(given) in _PLAIN_MEAN


def build_strategy(settings: RunSettings, around_aggregation: Callable[[Strategy], Strategy] | None = None) -> ScreenedStrategy:
    """The run's strategy. ``around_aggregation`` (a plain mean only) wraps what screening hands
    the valid updates to (central DP and the mean): the site-level audit's canary clients go in
    there."""
    given = settings.strategy
    name = given.strategy
    if name not in STRATEGIES:
        raise ConfigError("strategy", f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    common = _sampling(given)
    ffa = given.freezes_lora_a
    aggregator = _aggregator_name(given)
    if settings.secure.secure_aggregation:
        _check_secure(given, aggregator, around_aggregation is not None)
    if settings.dp.dp_mode == "distributed":
        _check_distributed(settings, aggregator)

    central_dp = None
    if aggregator == "hetlora":
        inner: Strategy = HetLoRA(max_rank=settings.model.lora_rank, **common)
    else:
        inner = _aggregator(aggregator, given, settings.schedule.learning_rate, common)
    if given.central_dp:
        if aggregator not in _PLAIN_MEAN:
            raise ConfigError(
                "central-dp",
                f"central-dp works with a plain mean of the updates (fedavg, fedprox, ffa-lora, "
                f"ffa-lora+fedprox), not with {name!r}: its noise is calibrated to that mean's sensitivity",
            )
        if given.num_sampled_clients < 1:
            raise ConfigError("num-sampled-clients", "central-dp needs num-sampled-clients: the number of sites sampled per round")
        inner = central_dp = CentralDP(
            inner,
            noise_multiplier=given.central_dp_noise_multiplier,
            clipping_norm=given.central_dp_clipping_norm,
            num_sampled_clients=given.num_sampled_clients,
            delta=given.central_dp_delta,
        )
    if ffa:
        inner = FreezeA(inner)
    if around_aggregation is not None:
        if aggregator not in _PLAIN_MEAN:
            raise ValueError(f"only a plain mean (fedavg, fedprox) can be wrapped, not {aggregator!r}")
        inner = around_aggregation(inner)
    # Under central DP every update is clipped to central-dp-clipping-norm, which bounds its
    # influence already; a relative rejection there would only fail the round (it needs exactly
    # num-sampled-clients updates), handing any one site a veto over every round.
    ratio = 0.0 if given.central_dp else given.update_norm_ratio
    norm_screen = NormScreen(ratio=ratio, max_norm=given.max_update_norm or None)
    return ScreenedStrategy(
        inner,
        min_valid=given.min_valid_updates,
        norm_screen=norm_screen,
        rank_flexible=aggregator == "hetlora",
        expected_upload=ffa_upload if ffa else (lambda arrays: arrays),
        central_dp=central_dp,
        upload_dtype=given.upload_dtype,
    )


# A fraction so small that Flower's int(available * fraction) is 0 for any federation, so that
# its sample size is exactly the minimum it is given.
_NONE_BUT_THE_MINIMUM = 1e-9


def _sampling(given: StrategySettings) -> dict[str, Any]:
    """Which sites a round trains and evaluates: ``fraction-train`` / ``fraction-evaluate`` of
    those connected (at least the ``min-*-nodes``), or, with ``num-sampled-clients`` = m > 0,
    exactly m sites drawn at random each round for both (a round of 10 sites costs the same
    whether 10 or 100 are connected)."""
    sampled = given.num_sampled_clients
    if sampled < 1:
        return dict(fraction_train=given.fraction_train, fraction_evaluate=given.fraction_evaluate,
                    min_train_nodes=given.min_train_nodes, min_evaluate_nodes=given.min_evaluate_nodes,
                    min_available_nodes=given.min_train_nodes)
    evaluates = given.fraction_evaluate > 0
    return dict(fraction_train=_NONE_BUT_THE_MINIMUM, min_train_nodes=sampled,
                fraction_evaluate=_NONE_BUT_THE_MINIMUM if evaluates else 0.0, min_evaluate_nodes=sampled if evaluates else 0,
                min_available_nodes=max(sampled, given.min_train_nodes))


def _check_secure(given: StrategySettings, aggregator: str, wrapped: bool) -> None:
    """What SecAgg+ cannot run with, refused by its key: it hides every single update."""
    if aggregator not in _PLAIN_MEAN:
        raise ConfigError("strategy", f"secure-aggregation sums the updates, so it works with a plain mean (fedavg, fedprox, "
                                      f"ffa-lora, ffa-lora+fedprox), not with {given.strategy!r}, which needs each update")
    if given.central_dp:
        raise ConfigError("central-dp", "central-dp clips each site's update at the server, which secure-aggregation hides from it")
    if given.upload_dtype != "fp32":
        raise ConfigError("upload-dtype", "secure-aggregation quantizes the updates itself; set upload-dtype = fp32")
    if wrapped:
        raise ConfigError("secure-aggregation", "canary clients (the site-level audit) add to single updates, which "
                                                "secure-aggregation hides; audit without it")


def _check_distributed(settings: RunSettings, aggregator: str) -> None:
    """What distributed DP needs, refused by its key: the noise shares add up only inside a
    SecAgg+ sum, of integer vectors that Flower's quantization keeps exact
    (``fedlora.secagg_grid``), and the sites send gradients, not locally trained adapters."""
    if not settings.dp.dp:
        raise ConfigError("dp-mode", "dp-mode = distributed is a DP mode: set dp = true, or dp-mode = local")
    if not settings.secure.secure_aggregation:
        raise ConfigError("secure-aggregation", "dp-mode = distributed adds each site's share of the noise inside the "
                                                "secure sum: set secure-aggregation = true")
    if aggregator == "fedprox":
        raise ConfigError("strategy", "dp-mode = distributed sends gradients, not locally trained adapters: a proximal "
                                      "term has nothing to act on (use fedavg or ffa-lora)")
    if not is_power_of_two(settings.secure.secagg_clipping_range):
        raise ConfigError("secagg-clipping-range", "dp-mode = distributed needs a power-of-two secagg-clipping-range, "
                                                   "so that each site's integer vector passes Flower's quantization exactly")
    if not settings.dp.noise_multiplier and not (settings.dp.target_epsilon > 0 and settings.dp.delta > 0):
        raise ConfigError("target-epsilon", "dp-mode = distributed needs a public multiplier for every secure sum: "
                                            "set noise-multiplier, or target-epsilon and delta")
    if settings.secure_sum_minimum - settings.dp.distributed_dp_colluders < 1:
        raise ConfigError("distributed-dp-colluders", "distributed-dp-colluders must be below the fewest updates a "
                                                      "secure sum holds, max(2, min-valid-updates): else no share is honest")


def _aggregator(name: str, given: StrategySettings, learning_rate: float, common: dict[str, Any]) -> FedAvg:
    """The Flower strategy that turns the sites' (screened) updates into the new global one."""
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=given.proximal_mu)
    if name in ("fedadam", "fedyogi"):
        server_opt = FedAdam if name == "fedadam" else FedYogi
        # eta_l is only logged by Flower; the sites' learning rate is the run's.
        return server_opt(**common, eta=given.server_learning_rate, eta_l=learning_rate, tau=given.server_tau)
    if name == "trimmed-mean":
        return FedTrimmedAvg(**common, beta=given.trim_beta)
    if name == "median":
        return FedMedian(**common)
    if name == "krum":
        if given.krum_select == 1:
            return Krum(**common, num_malicious_nodes=given.krum_byzantine)
        return MultiKrum(**common, num_malicious_nodes=given.krum_byzantine, num_nodes_to_select=given.krum_select)
    raise ConfigError("strategy", f"unknown aggregator {name!r}")
