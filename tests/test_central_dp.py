"""Attacks on the claims of ``strategies.central_dp``: the sensitivity of the released mean is
C/m under zero-out adjacency (2C/m under replace-one), the noise has std z C/m, and a resumed
run composes every earlier release at the noise multiplier it was made with.

The server is :class:`CentralDP` (or the whole screened strategy) on one float64 tensor ``w``,
driven through :class:`FakeGrid` by sites that add a fixed update to what they receive. Flower
draws the noise from NumPy's global generator, so seeding it before two aggregations gives both
the same noise and their difference is the difference of the clipped means alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
from dp_accounting import dp_event, privacy_accountant
from dp_accounting.rdp import RdpAccountant as DpAccountingRdp
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedlora.run_config import apply_overrides, default_run_config
from strategies.central_dp import CentralDP
from strategies.factory import build_strategy
from strategies.screening import ScreenedStrategy
from strategies.validation import TooFewUpdates
from server.history import read_history
from tests.fake_grid import FakeGrid, record
from tests.conftest import settings_of

DIM = 640
THETA = np.linspace(-1.0, 1.0, DIM)  # the global model before the round
DELTA = 1e-5


@pytest.fixture(autouse=True)
def server_identity():
    """Messages are stamped with the sender's identity; here the test plays the server."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1


def site(update: np.ndarray | None, num_examples: int = 10) -> Callable[[Message], Message]:
    """Replies θ + ``update`` (None: refuses, as a site with its budget spent does)."""

    def reply(msg: Message) -> Message:
        metrics = MetricRecord({"num-examples": num_examples})
        if update is None:
            status = ConfigRecord({"status": "budget-exhausted", "reason": "test"})
            return Message(RecordDict({"status": status, "metrics": metrics}), reply_to=msg)
        sent = {"w": msg.content["arrays"]["w"].numpy() + update}
        return Message(RecordDict({"arrays": record(sent), "metrics": metrics}), reply_to=msg)

    return reply


def central_dp(z: float, clip: float, m: int) -> CentralDP:
    return CentralDP(FedAvg(min_train_nodes=m, min_available_nodes=m), z, clip, m, DELTA)


def released_change(dp: CentralDP, updates: Sequence[np.ndarray], seed: int = 0, num_examples: Sequence[int] | None = None) -> np.ndarray:
    """θ' − θ of one round in which site i sends θ + updates[i]; noise drawn from ``seed``."""
    counts = num_examples or [10] * len(updates)
    grid = FakeGrid({i + 1: site(u, n) for i, (u, n) in enumerate(zip(updates, counts, strict=True))})
    messages = dp.configure_train(1, ArrayRecord({"w": Array(THETA)}), ConfigRecord(), grid)
    replies = grid.send_and_receive(messages)
    np.random.seed(seed)
    arrays, _ = dp.aggregate_train(1, replies)
    return arrays["w"].numpy() - THETA


def direction(seed: int, norm: float) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return norm * v / np.linalg.norm(v)


# The zero-out neighbour's update: an exactly zero one fails the round (see below).
VANISHING = direction(99, 1e-12)


# --- (a) sensitivity: C/m under zero-out, 2C/m under replace-one ----------------------------


def test_zeroing_one_sites_update_moves_the_release_by_at_most_c_over_m_and_attains_it():
    """Zero-out: site 0's update against a vanishing one (exactly zero fails the round, see
    below); everything else, the noise included, is the same."""
    z, clip, m = 1.0, 0.5, 4
    others = [direction(s, norm) for s, norm in ((1, 0.1), (2, 0.49), (3, 7.0))]  # the last is clipped
    for trial, norm in enumerate((0.05, 0.3, 0.5, 0.7, 3.0, 1e3)):
        target = direction(100 + trial, norm)
        with_site = released_change(central_dp(z, clip, m), [target, *others], seed=trial)
        zeroed = released_change(central_dp(z, clip, m), [VANISHING, *others], seed=trial)
        moved = np.linalg.norm(with_site - zeroed)
        # The clipped update over m: min(norm, C) / m <= C / m.
        assert moved == pytest.approx(min(norm, clip) / m, abs=1e-11)
        assert moved <= (clip + 1e-11) / m
    assert moved == pytest.approx(clip / m, rel=1e-9), "a large update attains the bound"


def test_example_counts_do_not_weight_the_mean():
    """A count-weighted mean would let the site with 97 % of the examples move it by ~C."""
    clip, m = 1.0, 3
    big = direction(7, 10.0)
    others = [direction(8, 0.2), direction(9, 0.2)]
    counts = [970, 15, 15]
    moved = released_change(central_dp(1.0, clip, m), [big, *others], num_examples=counts) - released_change(
        central_dp(1.0, clip, m), [VANISHING, *others], num_examples=counts
    )
    assert np.linalg.norm(moved) == pytest.approx(clip / m, rel=1e-9)


def test_replacing_one_sites_update_moves_the_release_by_2c_over_m():
    """Why fedlora claims no replace-one guarantee: at 2C/m the same noise is multiplier z/2."""
    clip, m = 1.0, 3
    others = [direction(1, 0.3), direction(2, 0.3)]
    up = direction(3, 5.0)
    moved = released_change(central_dp(1.0, clip, m), [up, *others]) - released_change(central_dp(1.0, clip, m), [-up, *others])
    assert np.linalg.norm(moved) == pytest.approx(2 * clip / m, rel=1e-9)


def test_flower_pairs_no_amplification_with_add_or_remove_only_and_the_relation_is_a_label():
    dp = central_dp(1.0, 1.0, 3)
    assert dp.accountant.config.neighboring_relation is NeighboringRelation.ADD_OR_REMOVE_ONE
    assert dp.accountant.config.sampling_method is SamplingMethod.NO_AMPLIFICATION
    with pytest.raises(ValueError, match="Unsupported privacy accounting model"):
        PrivacyConfig(DELTA, 3, NeighboringRelation.REPLACE_ONE, SamplingMethod.NO_AMPLIFICATION)

    # dp_accounting gives a bare Gaussian the same ε under every relation: z must already be
    # noise std / sensitivity under the claimed relation. Under replace-one that is z/2.
    def epsilon(relation: privacy_accountant.NeighboringRelation, z: float) -> float:
        accountant = DpAccountingRdp(neighboring_relation=relation)
        accountant.compose(dp_event.GaussianDpEvent(z))
        return accountant.get_epsilon(DELTA)

    relations = privacy_accountant.NeighboringRelation
    assert epsilon(relations.REPLACE_ONE, 1.0) == epsilon(relations.ADD_OR_REMOVE_ONE, 1.0) == epsilon(relations.REPLACE_SPECIAL, 1.0)
    dp.replay([{"noise_multiplier": 1.0}])
    assert dp.epsilon == pytest.approx(epsilon(relations.ADD_OR_REMOVE_ONE, 1.0))
    assert epsilon(relations.ADD_OR_REMOVE_ONE, 0.5) > 2 * dp.epsilon


def test_removing_a_site_outright_releases_nothing():
    """Participation is not protected: m − 1 updates fail the round instead of releasing."""
    dp = central_dp(1.0, 1.0, 3)
    grid = FakeGrid({1: site(direction(1, 0.1)), 2: site(direction(2, 0.1)), 3: site(None)})
    replies = [r for r in grid.send_and_receive(dp.configure_train(1, ArrayRecord({"w": Array(THETA)}), ConfigRecord(), grid))
               if "arrays" in r.content.array_records]
    with pytest.raises(TooFewUpdates, match="exactly 3"):
        dp.aggregate_train(1, replies)
    assert dp.round_release is None and dp.accountant.num_releases == 0


# --- (b) the noise: N(0, (z C / m)² I) ---------------------------------------------------------


@pytest.mark.parametrize("z, clip, m", [(1.0, 1.0, 3), (0.5, 2.0, 4), (3.0, 0.1, 2)])
def test_noise_of_the_released_mean_is_centred_with_std_z_c_over_m(z, clip, m):
    updates = [direction(i, norm) for i, norm in enumerate([0.5 * clip, 5.0 * clip, 0.1 * clip, 2.0 * clip][:m])]
    clipped_mean = sum(u * min(1.0, clip / np.linalg.norm(u)) for u in updates) / m
    noise = np.concatenate([
        released_change(central_dp(z, clip, m), updates, seed=seed) - clipped_mean for seed in range(200)
    ])  # 128 000 draws: the sample std is within 0.2 % (one standard error) of the truth
    assert noise.std() == pytest.approx(z * clip / m, rel=0.01)
    assert abs(noise.mean()) < 5 * z * clip / m / np.sqrt(noise.size)


# --- (c) resume at another noise multiplier ----------------------------------------------------


def strategy(z: float, m: int = 2) -> ScreenedStrategy:
    return build_strategy(settings_of(apply_overrides(default_run_config(), {
        "strategy": "fedavg", "central-dp": True, "central-dp-noise-multiplier": z,
        "central-dp-clipping-norm": 1.0, "central-dp-delta": DELTA, "num-sampled-clients": m,
    })))


def run_round(screened: ScreenedStrategy, server_round: int, sites: dict[int, Callable[[Message], Message]]) -> dict:
    """One round as ``server.federation`` runs it, and the central-DP part of its record."""
    grid = FakeGrid(sites)
    replies = grid.send_and_receive(screened.configure_train(server_round, record({"w": THETA}), ConfigRecord(), grid))
    failure = None
    try:
        screened.aggregate_train(server_round, replies)
    except TooFewUpdates as err:
        failure = str(err)
    return {"round": server_round, "failure": failure, "central_epsilon": screened.central_epsilon,
            "central_dp": screened.central_release()}


def expected_epsilon(accountant_orders: list[float], multipliers: list[float]) -> float:
    """Opacus' RDP of the Gaussian mechanism without amplification (q = 1), each release at its
    own multiplier, on the accountant's orders."""
    rdp = sum(compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=accountant_orders) for z in multipliers)
    epsilon, _ = get_privacy_spent(orders=accountant_orders, rdp=rdp, delta=DELTA)
    return float(epsilon)


def test_resume_composes_earlier_releases_at_their_recorded_noise():
    honest = {1: site(direction(1, 0.1)), 2: site(direction(2, 0.1))}
    first = strategy(0.3)
    history = [run_round(first, r, honest) for r in (1, 2)]
    history.append(run_round(first, 3, {1: site(direction(1, 0.1)), 2: site(None)}))  # refused: no release
    assert [h["central_dp"] for h in history] == [
        {"noise_multiplier": 0.3, "clipping_norm": 1.0, "num_sampled_clients": 2, "delta": DELTA}
    ] * 2 + [None]
    assert "exactly 2" in history[2]["failure"]

    resumed = strategy(3.0)
    resumed.restore(read_history(history))
    orders = resumed.central_dp.accountant.state_dict()["orders"]
    assert resumed.central_epsilon == pytest.approx(history[1]["central_epsilon"], rel=1e-12)
    assert resumed.central_epsilon == pytest.approx(expected_epsilon(orders, [0.3, 0.3]), rel=1e-3)

    history += [run_round(resumed, r, honest) for r in (4, 5)]
    assert history[-1]["central_dp"]["noise_multiplier"] == 3.0
    truth = expected_epsilon(orders, [0.3, 0.3, 3.0, 3.0])
    assert resumed.central_epsilon == pytest.approx(truth, rel=1e-3)
    # What the old replay (every release at the resumed run's z) reported: far too little.
    assert expected_epsilon(orders, [3.0] * 4) < truth / 4


def test_resume_refuses_a_released_round_without_recorded_noise():
    old = [{"round": 1, "failure": None, "central_epsilon": 4.2}]  # written before central_dp existed
    with pytest.raises(ValueError, match="round 1's history record has no central_dp .the noise multiplier"):
        strategy(3.0).restore(read_history(old))
    without = [{"round": 1, "failure": None, "central_epsilon": None, "central_dp": None}]
    with pytest.raises(ValueError, match="round 1's history record has no central_dp.*aggregated without central DP"):
        strategy(3.0).restore(read_history(without))


def test_resume_skips_failed_rounds_and_ignores_history_without_central_dp():
    failed = [{"round": 1, "failure": "round 1: 0 valid update(s)", "central_epsilon": 0.0}]  # old format, no release
    resumed = strategy(3.0)
    resumed.restore(read_history(failed))
    assert resumed.central_epsilon == 0.0
    plain = build_strategy(settings_of(apply_overrides(default_run_config(), {"strategy": "fedavg"})))
    plain.restore(read_history([{"round": 1, "failure": None, "central_epsilon": None}]))
    assert plain.central_epsilon is None and plain.central_release() is None


def test_an_unchanged_adapter_fails_the_round_instead_of_crashing_the_server():
    """Flower's clipping divides by ‖Δ‖: one site sending back θ must not end the run."""
    screened = strategy(1.0)
    entry = run_round(screened, 1, {1: site(direction(1, 0.1)), 2: site(np.zeros(DIM))})
    (unchanged,) = [o for o in screened.train_outcomes if o.outcome == "rejected"]
    assert "nothing was trained" in unchanged.reason and "nothing was released" in entry["failure"]
    assert entry["central_dp"] is None and screened.central_epsilon == 0.0
