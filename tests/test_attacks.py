"""Simulated attacks (simulations.attacks) against the default screening: each kind is rejected
or bounded as documented, with every strategy, with 2 sites, and in a real simulation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedlora.cli import UsageError, main, resolve_simulation
from fedlora.run_config import apply_overrides
from server.global_model import GlobalModel
from simulations.attacks import Attack, flip_labels
from strategies.factory import STRATEGIES, build_strategy
from server.history import read_history
from tests.conftest import LABELS, settings_of
from tests.fake_grid import Arrays, FakeGrid, FakeSite, decode, honest, outcomes, record, run_federation, server_run_config

import datasets
import pandas as pd


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1


@pytest.fixture(scope="module")
def config(tiny_bert, tmp_path_factory):
    return server_run_config(tiny_bert, tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def initial(config) -> Arrays:
    return decode(GlobalModel.load(settings_of(config)).arrays())


def attacker(kind: str, ffa: bool = False, seed: int = 99) -> FakeSite:
    """A site whose honest update is rewritten by ``Attack.corrupt``, as the simulation's mod does."""
    name, _, value = kind.partition(":")
    attack = Attack(name, float(value or 0), (0,), 1)
    train = honest(seed, ffa=ffa)

    def update(received: Arrays, server_round: int) -> Arrays:
        reply = record(train(received, server_round))
        return decode(attack.corrupt(record(received), reply, np.random.default_rng(server_round)))

    return FakeSite("attacker", 100, update)


# Documented outcome of each update attack against the default screen (update-norm-ratio 10),
# honest updates being steps of 0.01 per value.
EXPECTED = {
    "nan": ("rejected", "non-finite"),
    "scale:1e6": ("rejected", "update-norm-ratio"),
    "gaussian:1": ("rejected", "update-norm-ratio"),
    "wrong-shape": ("rejected", "wrong shape"),
    "free-rider": ("rejected", "nothing was trained"),
    "sign-flip": ("aggregated", ""),  # as large as an honest update: bounded by its weight
    "scale:3": ("aggregated", ""),  # within the honest range: bounded by 3x its weight
}


@pytest.mark.parametrize("kind", EXPECTED)
def test_each_update_attack_is_rejected_or_bounded_as_documented(kind, config, initial):
    sites = {n: FakeSite(f"honest-{n}", 100, honest(n)) for n in range(1, 5)} | {9: attacker(kind)}
    final, history = run_federation(build_strategy(settings_of(config)), FakeGrid(sites), initial, rounds=2)
    outcome, reason = EXPECTED[kind]
    for entry in history:
        seen = outcomes(entry)
        assert seen["attacker"][0] == outcome and reason in seen["attacker"][1], seen["attacker"]
        assert all(seen[f"honest-{n}"][0] == "aggregated" for n in range(1, 5))
    # Whatever got through, the global adapter moved by at most a few honest steps per value.
    assert max(np.abs(final[k] - initial[k]).max() for k in initial) < 0.2


@pytest.mark.parametrize("name", STRATEGIES)
def test_the_default_bound_works_with_two_sites_and_every_strategy(name, config, initial):
    run_config = apply_overrides(config, {"strategy": name})
    ffa = name.startswith("ffa-lora")
    sites = {1: FakeSite("honest", 100, honest(1, ffa=ffa)), 2: attacker("scale:1e6", ffa=ffa)}
    final, history = run_federation(build_strategy(settings_of(run_config)), FakeGrid(sites), initial, rounds=2)
    for entry in history:
        assert entry["failure"] is None
        assert outcomes(entry)["attacker"][0] == "rejected" and outcomes(entry)["honest"][0] == "aggregated"
        rejected = next(c for c in entry["clients"] if c["client"] == "attacker")
        assert rejected["update_norm"] > 1e3
    assert all(np.isfinite(v).all() for v in final.values())
    assert max(np.abs(final[k] - initial[k]).max() for k in initial) < 1.0


def test_under_central_dp_the_clip_bounds_a_boosted_update(config, initial):
    """Central DP needs exactly num-sampled-clients updates: there the clip is the bound, and a
    rejection would hand any one site a veto over every round."""
    run_config = apply_overrides(config, {"central-dp": True, "num-sampled-clients": 2, "central-dp-noise-multiplier": 0.01})
    sites = {1: FakeSite("honest", 100, honest(1)), 2: attacker("scale:1e6")}
    final, history = run_federation(build_strategy(settings_of(run_config)), FakeGrid(sites), initial, rounds=2)
    assert all(outcomes(entry)["attacker"][0] == "aggregated" for entry in history)
    # Two rounds of at most C / m = 0.5 each, plus tiny noise: the 1e6-times update is gone.
    change = sum(float(np.sum((final[k] - initial[k]).astype(np.float64) ** 2)) for k in initial) ** 0.5
    assert change < 1.2


def test_a_site_rejected_rounds_running_is_flagged(config, initial):
    sites = {1: FakeSite("a", 100, honest(1)), 2: FakeSite("b", 100, honest(2)), 3: attacker("scale:1e6")}
    _, history = run_federation(build_strategy(settings_of(config)), FakeGrid(sites), initial, rounds=3)
    flagged = [[c["client"] for c in r["clients"] if c["flagged"]] for r in history]
    assert flagged == [[], [], ["attacker"]]


def test_attack_settings_are_checked_and_attackers_drawn_from_the_seed():
    attack = Attack.from_settings({"attack": "scale:1e6", "attackers": 2, "attack-from-round": 2}, 5, seed=42)
    assert (attack.kind, attack.parameter, attack.from_round, len(attack.sites)) == ("scale", 1e6, 2, 2)
    assert attack == Attack.from_settings({"attack": "scale:1e6", "attackers": 2, "attack-from-round": 2}, 5, seed=42)
    assert Attack.from_record(attack.record()) == attack
    for settings, message in [
        ({"attack": "boost"}, "unknown kind 'boost'"),
        ({"attack": "scale"}, "write scale:NUMBER"),
        ({"attack": "nan:3"}, "write nan"),
        ({"attack": "gaussian:big"}, "not a number"),
        ({"attack": "nan", "attackers": 6}, "attackers"),
        ({"attack": "nan", "attack-from-round": 0}, "attack-from-round"),
    ]:
        with pytest.raises(ValueError, match=message):
            Attack.from_settings(settings, 5, seed=0)


def test_attack_keys_stay_out_of_the_run_config(tiny_bert):
    from fedlora.cli import build_parser

    args = build_parser().parse_args(["simulate", "--num-clients", "5", "--model", tiny_bert,
                                      "--set", "attack=sign-flip", "--set", "attackers=1"])
    settings, sites = resolve_simulation(args)
    assert not any(key.startswith("attack") for key in settings.as_dict())
    assert sites["attack"]["kind"] == "sign-flip" and len(sites["attack"]["sites"]) == 1
    args = build_parser().parse_args(["simulate", "--set", "attack=nan", "--set", "attackers=4"])
    with pytest.raises(UsageError, match="attackers"):
        resolve_simulation(args)


def test_an_update_attack_under_secure_aggregation_is_refused_not_run_honestly(tiny_bert):
    """SecAgg+ masks the update before any mod could rewrite it: the run would be honest while
    its report named an attack."""
    from fedlora.cli import build_parser

    base = ["simulate", "--num-clients", "5", "--model", tiny_bert, "--set", "secure-aggregation=true", "--set", "attackers=1"]
    with pytest.raises(UsageError, match="masks"):
        resolve_simulation(build_parser().parse_args([*base, "--set", "attack=sign-flip"]))
    _, sites = resolve_simulation(build_parser().parse_args([*base, "--set", "attack=label-flip"]))
    assert sites["attack"]["kind"] == "label-flip"


def test_label_flip_reverses_every_label():
    rows = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, len(LABELS) - 1]})
    flipped = flip_labels(rows, len(LABELS))
    assert flipped["text"] == ["a", "b", "c"]
    assert flipped["label"] == [len(LABELS) - 1, len(LABELS) - 2, 0]


def test_the_simulated_sites_app_rewrites_only_the_attackers_training_reply(config, initial, classification_csv, tmp_path):
    """An update attack acts in the simulation's ClientApp, after the honest site and its
    outgoing guard: the attacker's adapter is the corrupted honest one, the others are untouched."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from simulations.apps import build_site_app

    run = apply_overrides(config, {"dp": False, "probe-rounds": 0, "batch-size": 8, "local-steps": 2})
    sites = {i: {"site-name": f"site-{i}", "data-path": str(classification_csv), "dp": False} for i in (0, 1)}
    apps = {kind: build_site_app(settings_of(run), sites, attack) for kind, attack in
            (("honest", None), ("attacked", Attack("scale", 1e6, (1,), 1)))}

    def reply(kind: str, site: int) -> Arrays:
        message = Message(RecordDict({"arrays": record(initial), "config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=7, message_type="train")
        context = Context(run_id=1, node_id=7, node_config={"partition-id": site, "num-partitions": 2},
                          state=RecordDict(), run_config={})
        return decode(apps[kind](message, context).content["arrays"])  # no DP: the run's seed makes it repeat

    for site in (0, 1):
        honest_reply, attacked = reply("honest", site), reply("attacked", site)
        for name, value in honest_reply.items():
            expected = initial[name] + 1e6 * (value - initial[name]) if site == 1 else value
            np.testing.assert_allclose(attacked[name], expected, rtol=1e-5, atol=1e-3)


def test_simulated_label_flip_end_to_end(tiny_bert, classification_csv, tmp_path):
    out = tmp_path / "out"
    argv = ["simulate", "--num-clients", "3", "--rounds", "1", "--data", str(classification_csv), "--model", tiny_bert,
            "--output", str(out), "--set", "batch-size=8", "--set", "max-seq-length=32", "--set", "probe-rounds=0",
            "--set", f"label-names={','.join(LABELS)}", "--set", "attack=label-flip", "--set", "attackers=1"]
    assert main(argv) == 0
    (site,) = json.loads((out / "simulation.json").read_text())["attack"]["sites"]
    assert "attack" not in json.loads((out / "config.json").read_text())  # the server never saw it
    for entry in json.loads((out / "history.json").read_text()):
        # a data attack: an honest-looking update, bounded by its weight
        assert [outcome for outcome, _ in outcomes(entry).values()] == ["aggregated"] * 3
    flipped = pd.read_parquet(out / "attack" / "sites" / f"site-{site}.parquet")
    own = pd.read_parquet(out / "sites" / f"site-{site}.parquet")
    assert list(flipped["text"]) == list(own["text"]) and (flipped["label"] != own["label"]).any()


def test_a_round_with_too_few_valid_updates_aggregates_none_and_says_so(config, initial):
    """min-valid-updates = 2 and one of two sites attacks: the honest update is valid but the
    round is not aggregated, so it is recorded as ``valid``, never ``aggregated``, and the run,
    in which no round aggregated, fails."""
    from server.history import run_failure

    sites = {1: FakeSite("honest", 100, honest(1)), 2: attacker("nan")}
    final, history = run_federation(build_strategy(settings_of(apply_overrides(config, {"min-valid-updates": 2}))), FakeGrid(sites),
                                    initial, rounds=1)
    assert outcomes(history[0])["honest"] == ("valid", "round not aggregated (min-valid-updates)")
    assert outcomes(history[0])["attacker"][0] == "rejected" and history[0]["failure"]
    assert all(np.array_equal(final[k], initial[k]) for k in initial)
    assert run_failure(read_history(history)) == "no round aggregated an update (1 round(s) ran)"


def test_the_simulation_hands_each_site_its_own_file_and_the_flipper_its_flipped_one(tiny_run_config, monkeypatch):
    """What each virtual site is given, without running Flower: its partition's file, the
    run's label names (read once, from the data), and for a label-flipper its labels reversed."""
    import simulations.simulate as simulate

    given = {}
    monkeypatch.setattr(simulate, "run_flower_simulation", lambda **_: None)
    monkeypatch.setattr(simulate, "build_site_app", lambda settings, sites, *_: given.update(settings=settings, sites=sites))
    out = simulate.run_simulation(settings_of(tiny_run_config | {"label-names": ""}), 3,
                                  attack=Attack("label-flip", 0.0, (1,), 1))
    sites, labels = given["sites"], given["settings"].data.label_names
    assert labels == tuple(sorted(LABELS))  # the file's labels, named in the run config for every site
    assert [s["data-path"] for s in sites.values()] == [
        str(out / "sites" / "site-0.parquet"), str(out / "attack" / "sites" / "site-1.parquet"), str(out / "sites" / "site-2.parquet")]
    own, flipped = pd.read_parquet(out / "sites" / "site-1.parquet"), pd.read_parquet(sites[1]["data-path"])
    reverse = dict(zip(labels, reversed(labels)))
    assert list(flipped["text"]) == list(own["text"]) and list(flipped["label"]) == [reverse[x] for x in own["label"]]
    assert sites[1]["num-examples"] == len(own)
