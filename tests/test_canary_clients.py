"""Canary clients (``simulations.canary_clients``) in fedlora's real strategies, driven through a
fake grid: what they add to a round, and the site-level estimate they give of central DP, next
to its accountant, for a correct mechanism and for one that adds too little noise."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import dp_fixed_clipping
from flwr.supercore.task_identity import TaskIdentity

from fedlora.run_config import apply_overrides, default_run_config
from privacy.canary_cosines import SiteLevelEstimate, estimate_epsilon
from simulations.canary_clients import CanaryClients
from simulations.empirical import canary_clients_for
from strategies.factory import build_strategy
from tests.conftest import settings_of
from tests.fake_grid import FakeGrid, FakeSite, honest, run_federation

DELTA = 1e-5


@pytest.fixture(autouse=True)
def server_identity():
    """Messages are stamped with the sender's identity; here the test plays the server."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1


def settings(**overrides):
    return settings_of(apply_overrides(default_run_config(), {"min-train-nodes": 3, "min-evaluate-nodes": 3, **overrides}))


def central_dp(z: float = 1.0, clip: float = 1.0):
    return settings(**{"strategy": "fedavg", "central-dp": True, "central-dp-noise-multiplier": z,
                       "central-dp-clipping-norm": clip, "central-dp-delta": DELTA, "num-sampled-clients": 3})


def grid(scale: float, ffa: bool = False) -> FakeGrid:
    return FakeGrid({i + 1: FakeSite(f"site-{i}", 10 * (i + 1), honest(i, ffa=ffa, scale=scale)) for i in range(3)})


def test_canary_clients_add_a_sites_share_of_their_directions_to_the_sent_tensors_only():
    """fedavg under FFA-LoRA, no central DP: the round's aggregate is the mean of the updates plus
    (median update norm / m) Σ_j u_j on B and the head; the frozen A's stay as they were."""
    start = {"layer.lora_A.weight": np.ones((4, 8), np.float32), "layer.lora_B.weight": np.zeros((8, 4), np.float32),
             "head.weight": np.zeros((3, 8), np.float32)}
    run = settings(strategy="ffa-lora")
    canaries = CanaryClients(5, secret=3)
    plain, _ = run_federation(build_strategy(run), grid(0.1, ffa=True), start, rounds=1)
    canaried, _ = run_federation(build_strategy(run, canaries.insertion(run)), grid(0.1, ffa=True), start, rounds=1)
    sent = {name: value for name, value in start.items() if "lora_A" not in name}
    updates = [honest(i, ffa=True, scale=0.1)(start, 1) for i in range(3)]
    median = np.median([np.sqrt(sum(((u[k] - start[k]).astype(np.float64) ** 2).sum() for k in sent)) for u in updates])
    shapes = {name: value.shape for name, value in sorted(sent.items())}
    total = np.sum(list(canaries.directions(shapes, inserted=True)), axis=0)
    added = np.concatenate([(canaried[k].astype(np.float64) - plain[k]).ravel() for k in sorted(sent)])
    np.testing.assert_allclose(added, median / 3 * total, atol=1e-6)
    np.testing.assert_array_equal(canaried["layer.lora_A.weight"], start["layer.lora_A.weight"])


def test_directions_are_unit_fixed_by_the_secret_and_the_unseen_ones_differ():
    shapes = {"a": (30, 10), "b": (200,)}
    first = list(CanaryClients(4, secret=1).directions(shapes, inserted=True))
    assert all(u.shape == (500,) and np.linalg.norm(u) == pytest.approx(1.0) for u in first)
    np.testing.assert_array_equal(first[2], list(CanaryClients(4, secret=1).directions(shapes, inserted=True))[2])
    unseen = list(CanaryClients(4, secret=1).directions(shapes, inserted=False))
    other = list(CanaryClients(4, secret=2).directions(shapes, inserted=True))
    assert max(abs(u @ v) for u in first for v in unseen + other) < 0.3
    with pytest.raises(ValueError, match="at least 2"):
        CanaryClients(1, secret=1)


def test_cosines_are_only_taken_over_the_tensors_the_canaries_went_into():
    canaries = CanaryClients(3, secret=1)
    with pytest.raises(ValueError, match="no round's mean took the canary clients"):
        canaries.cosines({"w": np.ones(2000)})
    canaries.inserted_into = {"w": (2000,)}
    with pytest.raises(ValueError, match="not over the tensors the canary clients went into"):
        canaries.cosines({"w": np.ones(1000)})
    seen, unseen = canaries.cosines({"w": np.ones(2000)})
    assert seen.shape == unseen.shape == (3,)


def test_only_a_plain_mean_takes_canary_clients():
    assert canary_clients_for(settings(strategy="ffa-lora+fedprox"), 10)[0] is not None
    clients, skipped = canary_clients_for(settings(strategy="median"), 10)
    assert clients is None and "median" in skipped
    assert canary_clients_for(settings(), 0) == (None, "no canary clients (--canary-clients 0)")
    # By default only under central DP: without its noise, 100 canaries would swamp 3 sites' mean.
    assert canary_clients_for(settings(), None)[0] is None and "no central DP" in canary_clients_for(settings(), None)[1]
    assert canary_clients_for(central_dp(), None)[0].count == 100
    assert canary_clients_for(settings(), 12)[0].count == 12
    with pytest.raises(ValueError, match="at least 10"):
        canary_clients_for(central_dp(), 5)
    with pytest.raises(ValueError, match="plain mean"):
        run = settings(strategy="krum")
        build_strategy(run, CanaryClients(2, secret=1).insertion(run))


DIM, ROUNDS, CANARIES = 20_000, 4, 200


def audited_central_dp(z: float) -> tuple[SiteLevelEstimate, float]:
    """The site-level estimate and central DP's accountant of a federation of 3 sites whose
    updates are far above the clipping norm, with canary clients, over ROUNDS rounds of one tensor."""
    run = central_dp(z)
    canaries = CanaryClients(CANARIES, secret=5)
    np.random.seed(0)  # Flower draws central DP's noise from NumPy's global generator
    theta = np.zeros(DIM)
    final, history = run_federation(build_strategy(run, canaries.insertion(run)), grid(0.5), {"w": theta}, rounds=ROUNDS)
    seen, unseen = canaries.cosines({"w": final["w"] - theta})
    return estimate_epsilon(seen, unseen, DIM, DELTA), history[-1]["central_epsilon"]


@pytest.mark.parametrize("z", [1.0, 2.0])
def test_the_site_level_estimate_of_a_correct_central_dp_is_near_its_accountant_and_not_above_it(z):
    """Near: every canary is in every round, as the accountant assumes (no amplification). Not
    above: the accountant's ε is not below the estimate's whole 95% interval."""
    estimate, accountant = audited_central_dp(z)
    assert 0.8 * accountant < estimate.epsilon < 1.1 * accountant
    assert estimate.epsilon_interval[0] < accountant
    assert estimate.epsilon_interval[0] < estimate.epsilon < estimate.epsilon_interval[1]


def test_a_central_dp_that_adds_half_the_noise_it_accounts_for_is_caught(monkeypatch):
    """The attack: the noise std is half of z C / m while the accountant composes z. The
    estimate then lies well above the accountant's ε."""
    honest_noise = dp_fixed_clipping.compute_stdv
    monkeypatch.setattr(dp_fixed_clipping, "compute_stdv", lambda z, clip, m: honest_noise(z, clip, m) / 2)
    estimate, accountant = audited_central_dp(1.0)
    assert estimate.epsilon_interval[0] > 1.5 * accountant
