"""The ``strategy`` choices: aggregation by hand, screening inside a running federation, every
choice for two rounds (checkpointable), FedProx at the site, central DP, and one real Ray
simulation of FFA-LoRA with median aggregation under DP-SGD.

Most tests drive ``server.federation.Federation`` with :class:`FakeGrid`: a Grid whose sites are
plain functions from the server's message to their reply, so every reply can be crafted (or be
a real in-process ClientApp) without Ray.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from peft.utils import get_peft_model_state_dict

from client import app as client_app
from client.training import DPSettings, TrainSettings, train
from fedlora.run_config import RunSettings, apply_overrides, default_run_config
from fedlora.saved_adapter import load_adapter
from fedlora.tasks import encode
from server.global_model import GlobalModel
from simulations.simulate import run_simulation
from fedlora.sources import load_file
from strategies.factory import STRATEGIES, build_strategy
from strategies.ffa_lora import ffa_upload, is_frozen_key
from server.history import read_history
from tests.fake_grid import Arrays, FakeGrid, FakeSite, changed, decode, honest, outcomes, record, run_federation, server_run_config
from tests.conftest import LABELS, settings_of

def weighted_mean(updates: list[tuple[Arrays, float]]) -> Arrays:
    total = sum(w for _, w in updates)
    return {k: sum(w * u[k].astype(np.float64) for u, w in updates) / total for k in updates[0][0]}


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def server_identity():
    """Messages are stamped with the sender's identity; here the test plays the server."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1


@pytest.fixture(scope="module")
def config(tiny_bert, tmp_path_factory) -> dict[str, Any]:
    """Run config of the tiny BERT (rank 8: A [8, 32], B [32, 8] on query/value of 2 layers)."""
    return server_run_config(tiny_bert, tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def initial(config) -> Arrays:
    """The server's seeded initial adapter (B = 0, as PEFT initialises it)."""
    return decode(GlobalModel.load(settings_of(config)).arrays())


def configured(config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return apply_overrides(config, overrides)


# --- FFA-LoRA ---------------------------------------------------------------------------------


def test_ffa_lora_aggregate_is_exact_against_a_hand_computation(config, initial):
    strategy = build_strategy(settings_of(configured(config, strategy="ffa-lora")))
    weights = {1: 10, 2: 30, 3: 60}
    grid = FakeGrid({n: FakeSite(f"s{n}", w, honest(n, ffa=True)) for n, w in weights.items()})

    messages = list(strategy.configure_train(1, record(initial), ConfigRecord(), grid))
    assert all(set(m.content["arrays"].keys()) == set(initial) for m in messages), "sites need A to train B"
    replies = grid.send_and_receive(messages)
    sent = {r.metadata.src_node_id: decode(r.content["arrays"]) for r in replies}
    assert all(not any(is_frozen_key(k) for k in arrays) for arrays in sent.values())
    new, _ = strategy.aggregate_train(1, replies)
    new = decode(new)

    assert list(new) == list(initial), "a complete adapter in PEFT's key order"
    mean = weighted_mean([(sent[n], w) for n, w in weights.items()])
    for name, value in new.items():
        if is_frozen_key(name):
            np.testing.assert_array_equal(value, initial[name])
        else:
            np.testing.assert_allclose(value, mean[name], rtol=1e-5, atol=1e-7)
    # Exactness: the update of the aggregate, B_agg A, is the weighted mean of the sites' B_i A.
    for b_name in (k for k in new if "lora_B" in k):
        a = initial[b_name.replace("lora_B", "lora_A")].astype(np.float64)
        mean_update = sum(w * sent[n][b_name].astype(np.float64) @ a for n, w in weights.items()) / 100
        np.testing.assert_allclose(new[b_name] @ a, mean_update, rtol=1e-5, atol=1e-7)


def test_ffa_lora_uploads_half_of_fedavg_per_reply_ignoring_the_head(initial):
    def lora_bytes(arrays: ArrayRecord) -> int:
        return sum(len(a.data) for k, a in arrays.items() if "lora_" in k)

    full, upload = record(initial), ffa_upload(record(initial))
    assert lora_bytes(upload) * 2 == lora_bytes(full)
    assert set(full.keys()) - set(upload.keys()) == {k for k in initial if is_frozen_key(k)}


# --- screening inside a running federation ----------------------------------------------------

def _wrong_shape(arrays: Arrays) -> Arrays:
    name = next(k for k in arrays if "lora_B" in k)
    return arrays | {name: arrays[name][:, :4]}


def _nan(arrays: Arrays) -> Arrays:
    name = next(k for k in arrays if "lora_B" in k)
    poisoned = arrays[name].copy()
    poisoned[0, 0] = np.nan
    return arrays | {name: poisoned}


BAD_SITES: dict[str, tuple[Callable[[Arrays], Arrays], str]] = {
    "nan": (_nan, "non-finite values"),
    "wrong-shape": (_wrong_shape, "wrong shape"),
    "extra-key": (lambda a: a | {"base_model.model.bert.embeddings.word_embeddings.weight": np.zeros((4, 4), np.float32)}, "unexpected keys"),
    "missing-key": (lambda a: dict(list(a.items())[1:]), "missing keys"),
    "float64": (lambda a: {k: v.astype(np.float64) for k, v in a.items()}, "wrong dtype"),
    "huge-norm": (lambda a: {k: v + 1.0 for k, v in a.items()}, "exceeds max-update-norm"),
}


def test_every_rejection_is_recorded_and_only_valid_updates_are_aggregated(config, initial):
    strategy = build_strategy(settings_of(configured(config, strategy="fedavg", **{"max-update-norm": 5.0})))
    sites: dict[int, Callable[[Message], Message]] = {1: FakeSite("good-1", 10, honest(1)), 2: FakeSite("good-2", 30, honest(2))}
    for node, (name, (change, _)) in enumerate(BAD_SITES.items(), start=3):
        sites[node] = FakeSite(name, 1000, changed(honest(node), change))
    sites[20] = FakeSite("refuses", 1000, lambda received, server_round: None)
    sites[21] = lambda msg: Message(Error(code=0, reason="ClientApp raised"), reply_to=msg)
    grid = FakeGrid(sites)

    final, history = run_federation(strategy, grid, initial, rounds=2)

    assert [r["failure"] for r in history] == [None, None], "the run goes on past bad replies"
    for server_round, entry in enumerate(history, start=1):
        seen = outcomes(entry)
        assert seen["good-1"][0] == seen["good-2"][0] == "aggregated"
        for name, (_, reason) in BAD_SITES.items():
            assert seen[name][0] == "rejected" and reason in seen[name][1], (name, seen[name])
        assert seen["refuses"] == ("refused", "budget-exhausted (setting max-epsilon)")
        assert seen["node-21"] == ("failed", "ClientApp raised")
        assert len(seen) == len(sites)
    # The last global adapter is the weighted mean of the two valid updates of round 2 only.
    replies = grid.train_replies(2)
    expected = weighted_mean([(decode(replies[1].content["arrays"]), 10), (decode(replies[2].content["arrays"]), 30)])
    for name in initial:
        np.testing.assert_allclose(final[name], expected[name], rtol=1e-5, atol=1e-7)


# --- every strategy: two rounds, then a loadable PEFT adapter --------------------------------


@pytest.mark.parametrize("name", [s for s in STRATEGIES if s != "hetlora"])  # hetlora: tests/test_hetlora.py
def test_strategy_runs_two_rounds_and_saves_a_peft_adapter(name, config, initial, tmp_path):
    run_config = configured(config, strategy=name)
    ffa = name.startswith("ffa-lora")
    grid = FakeGrid({n: FakeSite(f"s{n}", 10 * n, honest(n, ffa=ffa)) for n in range(1, 6)})

    final, history = run_federation(build_strategy(settings_of(run_config)), grid, initial, rounds=2)

    for entry in history:
        assert entry["failure"] is None
        assert {c["outcome"] for c in entry["clients"]} == {"aggregated"} and len(entry["clients"]) == 5
        assert entry["eval_accuracy"] == pytest.approx(0.5)
    assert {k: (v.shape, v.dtype) for k, v in final.items()} == {k: (v.shape, v.dtype) for k, v in initial.items()}
    assert all(np.isfinite(v).all() for v in final.values())
    trained = [k for k in initial if not (ffa and is_frozen_key(k))]
    assert all(not np.array_equal(final[k], initial[k]) for k in trained)
    if ffa:
        assert all(np.array_equal(final[k], initial[k]) for k in initial if is_frozen_key(k))
    if "fedprox" in name:
        mus = {m.content["config"]["proximal-mu"] for m in grid.sent if m.metadata.message_type == MessageType.TRAIN}
        assert mus == {run_config["proximal-mu"]}

    global_model = GlobalModel.load(settings_of(run_config))
    global_model.set_arrays(record(final))
    model, _ = load_adapter(global_model.save(tmp_path / "adapter"), base_model=run_config["model"])  # PeftModel.from_pretrained
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(final)
    assert all(np.array_equal(loaded[k].numpy(), final[k]) for k in final)


def test_robust_aggregators_by_hand_with_one_outlier(config, initial):
    """Four honest sites and one that pushes every coordinate by +0.5 (50 times an honest step:
    the norm screen, switched off here, would reject it before any aggregator saw it)."""
    sites = {n: FakeSite(f"s{n}", 10 * n, honest(n)) for n in range(1, 5)}
    sites[5] = FakeSite("outlier", 10, changed(honest(5), lambda a: {k: v + 0.5 for k, v in a.items()}))

    def one_round(name: str, **overrides: Any) -> tuple[Arrays, list[Arrays]]:
        strategy = build_strategy(settings_of(configured(config, strategy=name, **{"update-norm-ratio": 0.0}, **overrides)))
        grid = FakeGrid(sites)
        replies = grid.send_and_receive(strategy.configure_train(1, record(initial), ConfigRecord(), grid))
        ordered = sorted(replies, key=lambda r: r.metadata.src_node_id)
        sent = [decode(r.content["arrays"]) for r in ordered]
        new, _ = strategy.aggregate_train(1, ordered)
        return decode(new), sent

    median, sent = one_round("median")
    trimmed, _ = one_round("trimmed-mean", **{"trim-beta": 0.2})
    krum, _ = one_round("krum", **{"krum-byzantine": 1})
    mean, _ = one_round("fedavg")
    honest_mean = weighted_mean([(s, 1.0) for s in sent[:4]])
    for k in initial:
        stacked = np.stack([s[k] for s in sent])
        np.testing.assert_allclose(median[k], np.median(stacked, axis=0), rtol=1e-6)
        # beta 0.2 of 5 sites: drop the lowest and the highest value of every coordinate.
        np.testing.assert_allclose(trimmed[k], np.sort(stacked, axis=0)[1:4].mean(axis=0), rtol=1e-5, atol=1e-7)
    assert any(all(np.array_equal(krum[k], s[k]) for k in initial) for s in sent[:4]), "Krum picks an honest update"

    def distance(a: Arrays) -> float:
        return float(np.sqrt(sum(np.sum((a[k] - honest_mean[k]) ** 2) for k in initial)))

    assert max(distance(median), distance(trimmed), distance(krum)) < distance(mean) / 4


# --- FedProx at the site ----------------------------------------------------------------------


def real_site(run_config: dict[str, Any], node_config: dict[str, Any], node_id: int) -> Callable[[Message], Message]:
    context = Context(run_id=1234, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=run_config)
    return lambda msg: client_app.app(msg, context)


def test_fedprox_proximal_term_reaches_the_site_and_shrinks_its_update(tiny_run_config, classification_csv, tmp_path):
    """Real in-process sites, DP off, same start and seeds: only mu differs between runs."""

    def global_update(mu: float, run: str) -> Arrays:
        run_config = apply_overrides(tiny_run_config, {
            "strategy": "fedprox", "proximal-mu": mu, "dp": False, "local-steps": 3, "fraction-evaluate": 0.0,
        })
        sites = {
            n: real_site(run_config, {"data-path": str(classification_csv), "dp": False, "site-name": f"s{n}",
                                      "ledger-path": str(tmp_path / run / f"s{n}.db")}, n)
            for n in (1, 2)
        }
        start = decode(GlobalModel.load(settings_of(run_config)).arrays())
        final, history = run_federation(build_strategy(settings_of(run_config)), FakeGrid(sites), start, rounds=1)
        assert all(c["outcome"] == "aggregated" for entry in history for c in entry["clients"])
        return {k: final[k] - start[k] for k in start}

    plain, again, proximal = global_update(0.0, "a"), global_update(0.0, "b"), global_update(50.0, "c")

    def norm(update: Arrays) -> float:
        return float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in update.values())))

    assert all(np.array_equal(plain[k], again[k]) for k in plain), "runs are reproducible without DP"
    assert any(not np.allclose(plain[k], proximal[k]) for k in plain)
    assert norm(proximal) < 0.8 * norm(plain), "the proximal term pulls the adapter towards the global one"


def test_proximal_term_survives_dp_sgd(tiny_run_config, classification_csv):
    """Under DP-SGD the proximal gradient is added after Opacus' clipping and noise, not lost."""
    global_model = GlobalModel.load(settings_of(tiny_run_config))
    start = {k: v.clone() for k, v in global_model.arrays().to_torch_state_dict().items()}
    data = load_file(str(classification_csv), settings_of(tiny_run_config).data, LABELS)
    examples = encode(data, global_model.tokenizer, "classification", 32)
    settings = TrainSettings(learning_rate=0.05, batch_size=8, steps=3, seed=3)

    def update_norm(mu: float) -> float:
        global_model.set_arrays(ArrayRecord(start))
        torch.manual_seed(0)
        train(global_model.model, examples, "classification", global_model.tokenizer.pad_token_id, settings,
              DPSettings(noise_multiplier=1e-3, max_grad_norm=1.0), proximal_mu=mu)
        now = global_model.arrays().to_torch_state_dict()
        return float(torch.sqrt(sum(((now[k] - start[k]) ** 2).sum() for k in start)))

    assert update_norm(200.0) < 0.8 * update_norm(0.0)


# --- central DP -------------------------------------------------------------------------------


def test_central_dp_reports_epsilon_and_adds_calibrated_noise(config, initial):
    z, clip, m = 1.0, 1.0, 3
    run_config = configured(config, strategy="fedavg", **{
        "central-dp": True, "central-dp-noise-multiplier": z, "central-dp-clipping-norm": clip,
        "num-sampled-clients": m, "central-dp-delta": 1e-5,
    })
    # Updates of norm about 0.01 * sqrt(2147) = 0.46 < C: clipping leaves them as they are.
    sites = {n: FakeSite(f"s{n}", w, honest(n)) for n, w in ((1, 10), (2, 30), (3, 60))}
    sites[3] = FakeSite("s3", 60, lambda received, r: None if r == 3 else honest(3)(received, r))
    grid = FakeGrid(sites)
    strategy = build_strategy(settings_of(run_config))

    final, history = run_federation(strategy, grid, initial, rounds=3)

    epsilons = [entry["central_epsilon"] for entry in history]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    for releases, epsilon in ((1, epsilons[0]), (2, epsilons[1])):
        # Opacus' RDP accountant for the Gaussian mechanism without amplification (q = 1).
        expected, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=1.0, noise_multiplier=z, steps=releases, orders=orders), delta=1e-5)
        assert epsilon == pytest.approx(float(expected), rel=1e-3)
    assert 0 < epsilons[0] < epsilons[1]
    # Round 3: one site refused, so exactly-m cannot hold: nothing released, nothing spent.
    assert "central DP needs exactly 3" in history[2]["failure"] and epsilons[2] == epsilons[1]
    released = {"noise_multiplier": z, "clipping_norm": clip, "num_sampled_clients": m, "delta": 1e-5}
    assert [entry["central_dp"] for entry in history] == [released, released, None]

    # The round-2 aggregate is the *equally weighted* mean plus N(0, (zC/m)^2) noise.
    replies = grid.train_replies(2)
    uniform = weighted_mean([(decode(replies[n].content["arrays"]), 1.0) for n in (1, 2, 3)])
    noise = np.concatenate([(final[k] - uniform[k]).ravel() for k in initial])  # round 3 changed nothing
    assert noise.std() == pytest.approx(z * clip / m, rel=0.1)
    assert abs(noise.mean()) < 0.05

    # A resume replays the recorded releases, at their z even where the resumed run's differs.
    resumed = build_strategy(settings_of({**run_config, "central-dp-noise-multiplier": 10 * z}))
    resumed.restore(read_history(history))
    assert resumed.central_epsilon == pytest.approx(epsilons[1])


def test_central_dp_under_ffa_lora_leaves_a_untouched(config, initial):
    run_config = configured(config, strategy="ffa-lora", **{"central-dp": True, "num-sampled-clients": 2})
    grid = FakeGrid({n: FakeSite(f"s{n}", 10, honest(n, ffa=True)) for n in (1, 2)})
    final, history = run_federation(build_strategy(settings_of(run_config)), grid, initial, rounds=1)
    assert history[0]["central_epsilon"] > 0
    assert all(np.array_equal(final[k], initial[k]) == is_frozen_key(k) for k in initial)


@pytest.mark.parametrize("overrides, message", [
    ({"strategy": "median", "num-sampled-clients": 3}, "plain mean"),
    ({"strategy": "ffa-lora+krum", "num-sampled-clients": 3}, "plain mean"),
    ({"strategy": "fedavg"}, "num-sampled-clients"),
])
def test_central_dp_refuses_what_its_accounting_cannot_cover(config, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_strategy(settings_of(configured(config, **{"central-dp": True, **overrides})))


def test_unknown_strategy_names_the_choices(config):
    with pytest.raises(ValueError, match="ffa-lora\\+median"):
        build_strategy(settings_of(configured(config, strategy="fedsgd")))


# --- one real simulation: FFA-LoRA + median, DP-SGD at the sites ------------------------------


def test_simulation_ffa_lora_with_median_keeps_a_and_halves_uploads(tiny_run_config):
    run_config = apply_overrides(tiny_run_config, {
        "strategy": "ffa-lora+median", "num-server-rounds": 2, "local-steps": 2, "noise-multiplier": 1.0,
    })
    initial = decode(GlobalModel.load(settings_of(run_config)).arrays())
    out = run_simulation(settings_of(run_config), 3)

    history = json.loads((out / "history.json").read_text())
    head = sum(len(record(initial)[k].data) for k in initial if "lora_" not in k)
    for entry in history:
        assert entry["failure"] is None and entry["central_epsilon"] is None
        assert [c["outcome"] for c in entry["clients"]] == ["aggregated"] * 3
        for client in entry["clients"]:
            assert 0 < client["epsilon"] <= 8.0, "DP-SGD ran at the site"
            assert client["bytes_up"] == ffa_upload(record(initial)).count_bytes()
            assert (client["bytes_up"] - head) / (client["bytes_down"] - head) == pytest.approx(0.5, abs=0.02)

    for adapter_dir in (out / "checkpoints" / "round-1", out / "adapter"):
        model, _ = load_adapter(adapter_dir, base_model=run_config["model"])  # PeftModel.from_pretrained
        saved = {k: v.numpy() for k, v in get_peft_model_state_dict(model).items()}
        assert set(saved) == set(initial)
        for name in initial:
            if is_frozen_key(name):
                np.testing.assert_array_equal(saved[name], initial[name])  # A: the run's seeded A, every round
            else:
                assert not np.array_equal(saved[name], initial[name])


def test_num_sampled_clients_trains_and_evaluates_exactly_that_many_of_those_connected():
    """Round cost flat in the federation's size: 4 of 25 sites per round, a fresh draw each."""
    settings = RunSettings.parse(apply_overrides(default_run_config(), {"num-sampled-clients": 4}))
    grid = FakeGrid({i: FakeSite(f"site-{i}", 10, honest(i)) for i in range(1, 26)})
    initial = {"layer.lora_A.weight": np.zeros((2, 4), np.float32), "layer.lora_B.weight": np.zeros((4, 2), np.float32)}
    _, history = run_federation(build_strategy(settings), grid, initial, rounds=3)
    for entry in history:
        assert len(entry["clients"]) == 4 and len(entry["evaluations"]) == 4
    assert len({c["client"] for r in history for c in r["clients"]}) > 4  # not the same 4 every round
