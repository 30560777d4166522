"""Distributed DP (dp-mode = distributed): the integer grid through Flower's quantization, the
rounding's sensitivity bound, and a site's round, attacked where a server could weaken it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.quantization import quantize
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from fedlora.run_config import ConfigError, apply_overrides
from fedlora.secagg_grid import HALF, LEVELS, MODULUS, integer_sum, quantizer_input, wrapped
from privacy import distributed_dp, skellam
from privacy.distributed_dp import grid_scale, grid_sensitivity, rounded_units
from privacy.ledger import PrivacyLedger
from privacy.plan import public_noise_multiplier
from privacy.skellam import MECHANISM
from server.global_model import GlobalModel
from strategies.factory import build_strategy
from tests.conftest import settings_of


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1


def test_integer_vectors_pass_flowers_quantization_exactly_and_sum_back():
    """Flower's own quantization (stochastic rounding, clipping) leaves the grid's values as they
    are, and the sum of three sites' quantized vectors mod 2^32 gives back their integer sum
    (mod 2^22, read around 0), wraps included."""
    rng = np.random.default_rng(0)
    vectors = [rng.integers(-3 * HALF, 3 * HALF, size=5000) for _ in range(3)]
    vectors[0][:3] = [HALF - 1, -HALF, 0]
    for clipping_range in (1.0, 0.25, 8.0):
        quantized = [quantize([quantizer_input(k, clipping_range)], clipping_range, LEVELS)[0] for k in vectors]
        for k, q in zip(vectors, quantized, strict=True):
            assert np.array_equal(q.astype(np.int64), wrapped(k) + HALF)
        total = np.mod(sum(q.astype(np.int64) for q in quantized), MODULUS)
        assert np.array_equal(integer_sum(total, 3), wrapped(sum(vectors)))
    with pytest.raises(ValueError, match="power-of-two"):
        quantizer_input(vectors[0], 3.0)


def test_a_rounded_unit_never_exceeds_the_sensitivity_and_the_rounding_is_unbiased():
    generator = torch.Generator().manual_seed(0)
    d, clip = 300, 0.5
    gradients = torch.randn(200, d) * torch.logspace(-3, 3, 200).unsqueeze(1)
    gradients[7, 3] = math.nan
    for index in range(200):
        total, zeroed = rounded_units(gradients[index:index + 1], clip, d, generator)
        assert total.dtype == torch.int64
        assert float(total.double().norm()) <= grid_sensitivity(d)
        assert zeroed == (index == 7)
    exact = gradients[:5] * (clip / gradients[:5].norm(dim=1, keepdim=True)).clamp(max=1) * grid_scale(d, clip)
    draws = torch.stack([rounded_units(gradients[:5], clip, d, generator)[0] for _ in range(400)]).double()
    # each value: a sum of 5 rounding draws (variance <= 5/4), averaged 400 times: within 5 std
    assert torch.allclose(draws.mean(dim=0), exact.sum(dim=0).double(), atol=5 * math.sqrt(1.25 / 400))


def test_rounding_needs_the_sqrt_d_in_the_sensitivity():
    """A sensitivity of gamma C alone (no room for the rounding) would be wrong: a clipped
    vector of norm exactly gamma C that rounds up in every coordinate is longer, though never
    longer than D2."""
    d = 400
    per_value = grid_scale(d, 1.0) / math.sqrt(d)  # 64: an integer, so shift half the values down
    low = per_value - 0.5
    scaled = torch.tensor([low, math.sqrt(2 * per_value**2 - low**2)] * (d // 2), dtype=torch.float64)
    assert float(scaled.norm()) == pytest.approx(grid_scale(d, 1.0))
    assert float(torch.ceil(scaled).norm()) > grid_scale(d, 1.0)
    assert float(torch.ceil(scaled).norm()) <= grid_sensitivity(d)


def distributed_config(config: dict, **more) -> dict:
    return apply_overrides(config, {"secure-aggregation": True, "dp-mode": "distributed", "min-valid-updates": 3,
                                    "num-server-rounds": 3, **more})


def context(config: dict, node: dict, tmp_path, **setup) -> Context:
    """A site's context inside a SecAgg+ round whose setup stage Flower's mod recorded (the run
    config's parameters, 3 sites, unless ``setup`` says otherwise)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    settings = settings_of(config)
    state = {"clipping_range": settings.secure.secagg_clipping_range, "target_range": LEVELS, "mod_range": MODULUS,
             "max_weight": settings.secure.secagg_max_weight, "sample_num": 3, **setup}
    return Context(run_id=1234, node_id=7, node_config=node, run_config=config,
                   state=RecordDict({RECORD_KEY_STATE: ConfigRecord(state)}))


def node_config(csv, tmp_path, **more) -> dict:
    return {"data-path": str(csv), "ledger-path": str(tmp_path / "l.db"), "num-examples": 90, **more}


def train_message(arrays: ArrayRecord, server_round: int = 1, secure: bool = True) -> Message:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    if secure:  # the collect stage, as train_site sees it inside Flower's mod
        content[RECORD_KEY_CONFIGS] = ConfigRecord({"ctxts": [b"c"], "srcs": [2]})
    return Message(content=content, dst_node_id=7, message_type="train")


@pytest.mark.parametrize("server_round", [1, 2])
def test_a_site_sends_its_noisy_gradient_sum_on_the_grid_and_charges_a_skellam_row(
        tiny_run_config, classification_csv, tmp_path, monkeypatch, server_round):
    """Round 1 is the probe phase (the head alone), round 2 fine-tunes (LoRA and the head): the
    mod gets one exact grid value per received tensor at weight ratio 1, the gradient only where
    the round trains (seen with the noise taken out), the noise everywhere (so every coordinate
    of a sum holds every site's share, whichever round the server told each site it was), and
    the ledger a ``distributed:skellam`` row whose D2 is the whole adapter's."""
    config = distributed_config(tiny_run_config, **{"probe-rounds": 1})
    sent = GlobalModel.load(settings_of(config)).arrays()
    seen = {}
    real_share = skellam.skellam_noise

    def share(dimensions, variance):
        seen.update(dimensions=dimensions, variance=variance)
        return real_share(dimensions, variance)

    monkeypatch.setattr("client.distributed_site.skellam_noise", share)
    node = node_config(classification_csv, tmp_path, **{"distributed-dp-colluders": 0})
    reply = client_app.train_site(train_message(sent, server_round), context(config, node, tmp_path), config)
    assert "status" not in reply.content.config_records, reply.content
    upload = reply.content["fitres.parameters"]
    assert list(upload.keys()) == list(sent.keys())
    assert reply.content["fitres.num_examples"]["num_examples"] == settings_of(config).secure.secagg_max_weight
    assert all(value.numpy().any() for value in upload.values())  # the noise share covers every value
    levels = [value.numpy().astype(np.float64) * HALF for value in upload.values()]  # c = 1: value * 2^21 = j
    assert all(np.array_equal(v, np.round(v)) for v in levels)
    assert seen["dimensions"] == sum(value.numpy().size for value in sent.values())
    metrics = reply.content["metrics"]
    assert metrics["grid-scale"] == pytest.approx(grid_scale(seen["dimensions"], 1.0))
    with PrivacyLedger(tmp_path / "l.db", read_only=True) as ledger:
        (row, *_) = ledger.spends()
    assert row.mechanism == MECHANISM and row.sample_rate == 1.0 and row.steps == 1
    assert row.rng_mode.startswith("skellam:numpy-pcg64")
    assert row.noise_multiplier == metrics["noise-multiplier"]
    d2 = grid_sensitivity(seen["dimensions"])
    assert row.max_grad_norm == pytest.approx(d2)
    # it counts its own share and the public share of the 2 others (n = 3, no colluder)
    public = (public_noise_multiplier(settings_of(config), d2) * d2) ** 2 / 3
    assert seen["variance"] >= public
    assert row.noise_multiplier == pytest.approx(math.sqrt(seen["variance"] + 2 * public) / d2, rel=1e-12)
    assert 0 < metrics["epsilon"] <= 8.0
    # the gradient alone: the head in the probe round, LoRA (B; A's gradient is 0 while B is) after
    monkeypatch.setattr("client.distributed_site.skellam_noise", lambda d, variance: np.zeros(d, np.int64))
    node["ledger-path"] = str(tmp_path / "again.db")
    upload = client_app.train_site(train_message(sent, server_round), context(config, node, tmp_path), config).content[
        "fitres.parameters"]
    trained = [name for name, value in upload.items() if value.numpy().any()]
    assert any(".classifier." in name for name in trained)
    assert any(".lora_B." in name for name in trained) == (server_round == 2)


def _round(config: dict, node: dict, tmp_path, monkeypatch, **setup) -> tuple[float, float, float]:
    """One site's distributed round with its noise captured: (its share's variance, the z its
    ledger row records, D2)."""
    seen = {}
    monkeypatch.setattr("client.distributed_site.skellam_noise",
                        lambda d, variance: seen.update(variance=variance) or np.zeros(d, np.int64))
    sent = GlobalModel.load(settings_of(config)).arrays()
    reply = client_app.train_site(train_message(sent), context(config, node, tmp_path, **setup), config)
    assert "status" not in reply.content.config_records, reply.content
    with PrivacyLedger(Path(node["ledger-path"]), read_only=True) as ledger:
        row = ledger.spends()[0]
    return seen["variance"], row.noise_multiplier, row.max_grad_norm


def test_the_noise_a_site_counts_on_follows_its_own_collusion_bound_not_the_servers(
        tiny_run_config, classification_csv, tmp_path, monkeypatch):
    """The server's run config says no site colludes; this site assumes one may. It counts only
    its own share and one other's public share (not two): its ledger records less noise than a
    site that believed the server, for the same share."""
    config = distributed_config(tiny_run_config)
    trusting, z_trusting, d2 = _round(config, node_config(classification_csv, tmp_path / "a", **{
        "distributed-dp-colluders": 0}), tmp_path, monkeypatch)
    wary, z_wary, _ = _round(config, node_config(classification_csv, tmp_path / "b", **{
        "distributed-dp-colluders": 1}), tmp_path, monkeypatch)
    public = (public_noise_multiplier(settings_of(config), d2) * d2) ** 2 / 3
    assert z_trusting == pytest.approx(math.sqrt(trusting + 2 * public) / d2, rel=1e-12)
    assert z_wary == pytest.approx(math.sqrt(wary + public) / d2, rel=1e-12)
    assert wary > trusting  # to reach the same target with one share fewer, it adds more itself


def test_sites_with_other_budgets_never_count_on_more_noise_than_the_others_add(
        tiny_run_config, classification_csv, tmp_path, monkeypatch):
    """Three sites of one sum, with different budgets, floors and collusion bounds: what each
    site's ledger claims must be covered by the noise actually there: its own share plus the
    shares of the others it counts on, each the least any other site adds. (When each site sized
    its share from its own z alone, a site with a small budget counted on shares as large as its
    own, which the others did not add: epsilon 2.00 claimed, 3.37 real.)"""
    config = distributed_config(tiny_run_config)
    nodes = [
        {"distributed-dp-colluders": 0},
        {"distributed-dp-colluders": 0, "max-epsilon": 2.0, "max-epsilon-per-run": 2.0},
        {"distributed-dp-colluders": 1, "min-noise-multiplier": 2.0},
    ]
    rounds = [_round(config, node_config(classification_csv, tmp_path / str(i), **node), tmp_path, monkeypatch)
              for i, node in enumerate(nodes)]
    variances = [variance for variance, _, _ in rounds]
    for index, (own, z, d2) in enumerate(rounds):
        colluders = nodes[index]["distributed-dp-colluders"]
        others = sorted(v for i, v in enumerate(variances) if i != index)[:3 - colluders - 1]  # the smallest honest ones
        assert (z * d2) ** 2 <= own + sum(others) + 1e-6 * own


def test_a_server_that_inflates_the_sum_cannot_thin_a_sites_own_share_below_its_floor(
        tiny_run_config, classification_csv, tmp_path, monkeypatch):
    """min-valid-updates is the server's: at 100 the public share would be z_run / 10 of the
    noise. The site's min-noise-multiplier (1.0 here) holds for its share alone."""
    config = distributed_config(tiny_run_config, **{"min-valid-updates": 100})
    node = node_config(classification_csv, tmp_path, **{"distributed-dp-colluders": 0, "min-noise-multiplier": 1.0})
    own, _, d2 = _round(config, node, tmp_path, monkeypatch, sample_num=100)
    assert own >= d2**2 * (1 - 1e-12)


@pytest.mark.parametrize("node, secure, setup, setting", [
    ({}, True, {}, "distributed-dp-colluders"),  # never opted in: its noise would rest on others'
    ({"distributed-dp-colluders": 2}, True, {}, "distributed-dp-colluders"),  # no share left honest at n = 2
    ({"distributed-dp-colluders": 0}, False, {}, "secure-aggregation"),  # no SecAgg+: its share alone would leave
    # SecAgg+ set up with a max weight that would scale this site's vector, its noise with it, to 0
    ({"distributed-dp-colluders": 0}, True, {"max_weight": 1e12}, "secure-aggregation"),
    ({"distributed-dp-colluders": 0}, True, {"clipping_range": 0.5}, "secure-aggregation"),
    ({"distributed-dp-colluders": 0}, True, {"sample_num": 1}, "min-valid-updates"),  # fewer sites than shares counted
    ({"distributed-dp-colluders": 0, "secure-noise": True}, True, {}, "secure-noise"),  # Skellam's sampler is no CSPRNG
    # a run config that no server should send (its factory refuses it): the site refuses it too
    ({"distributed-dp-colluders": 0}, True, {"clipping_range": 3.0}, "secure-aggregation"),  # no exact grid
    ({"distributed-dp-colluders": 0}, True, {"target-epsilon": 0.0}, "target-epsilon"),  # no public multiplier
])
def test_a_site_refuses_a_distributed_round_it_cannot_trust_before_spending(
        tiny_run_config, classification_csv, tmp_path, node, secure, setup, setting):
    run = {key: setup.pop(key) for key in ("target-epsilon",) if key in setup}
    if setup.get("clipping_range") == 3.0:
        run["secagg-clipping-range"] = 3.0
    config = distributed_config(tiny_run_config, **{"min-valid-updates": 2, **run})
    sent = GlobalModel.load(settings_of(config)).arrays()
    ctx = context(config, node_config(classification_csv, tmp_path, **node), tmp_path, **setup)
    reply = client_app.train_site(train_message(sent, secure=secure), ctx, config)
    assert dict(reply.content["status"]) == {"status": "policy-refused", "setting": setting}
    with PrivacyLedger(tmp_path / "l.db", read_only=True) as ledger:
        assert ledger.spends() == []


@pytest.mark.parametrize("change, key", [
    ({"secure-aggregation": False}, "secure-aggregation"),
    ({"dp": False}, "dp-mode"),
    ({"strategy": "fedprox"}, "strategy"),
    ({"secagg-clipping-range": 3.0}, "secagg-clipping-range"),
    ({"distributed-dp-colluders": 3}, "distributed-dp-colluders"),
    ({"target-epsilon": 0.0}, "target-epsilon"),
])
def test_the_server_refuses_a_distributed_run_it_cannot_run_by_its_key(tiny_run_config, change, key):
    with pytest.raises(ConfigError) as refused:
        build_strategy(settings_of(distributed_config(tiny_run_config, **change)))
    assert refused.value.setting == key


def _real_sites(config: dict, csv, tmp_path, count: int = 3) -> dict:
    """``count`` sites running fedlora's real ClientApp (SecAgg+ mod included), on one data file."""
    contexts = {nid: Context(run_id=1234, node_id=nid, state=RecordDict(), run_config=config, node_config={
        "data-path": str(csv), "ledger-path": str(tmp_path / f"site-{nid}.db"), "num-examples": 90,
        "distributed-dp-colluders": 0, "site-name": f"site-{nid}"}) for nid in range(1, count + 1)}
    return {nid: (lambda msg, ctx=ctx: client_app.app(msg, ctx)) for nid, ctx in contexts.items()}


def _clipped_gradient_mean(config: dict, csv, tmp_path, arrays: ArrayRecord) -> tuple[dict[str, np.ndarray], int]:
    """What the server's step should follow, computed apart: every training row's gradient at
    the global adapter by plain autograd (one row at a time), clipped to C and averaged over the
    site's public population (also returned)."""
    from client.site import Site
    from client.training import without_dropout
    from fedlora.adapters import state_key
    from fedlora.tasks import collate, forward_logits, per_example_loss

    settings = settings_of(config)
    ctx = Context(run_id=1234, node_id=99, state=RecordDict(), run_config=config, node_config={
        "data-path": str(csv), "ledger-path": str(tmp_path / "apart.db"), "num-examples": 90})
    site = Site(ctx, settings)
    policy, dp = site._privacy()
    data = site._data(policy, dp)
    model, tokenizer = site._model(arrays)
    encoded = site._encode(data.train, data.units(data.train), tokenizer, "training")
    params = [(state_key(n), p) for n, p in model.named_parameters() if p.requires_grad]
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params}
    model.train()
    with without_dropout(model):
        for example in encoded.examples:
            model.zero_grad()
            batch = collate([example], tokenizer.pad_token_id, settings.data.task)
            per_example_loss(forward_logits(model, batch), batch["labels"], settings.data.task).sum().backward()
            norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for _, p in params))
            for name, p in params:
                total[name] += p.grad.double() * min(1.0, dp.max_grad_norm / norm)
    model.zero_grad(set_to_none=True)  # the site's model is kept warm for the next test
    population = site._population(policy, dp, encoded.num_units)
    return {name: (value / population).numpy() for name, value in total.items()}, population


@pytest.mark.parametrize("noise", [False, True])
def test_a_federation_steps_along_the_sites_clipped_mean_gradient_through_secagg(
        tiny_run_config, classification_csv, tmp_path, monkeypatch, noise):
    """Three real sites and the real SecAgg+ protocol, one fine-tuning round: without noise the
    server's update is -lr times the clipped mean gradient computed apart by autograd (to the
    grid's rounding); with it, the update differs from that by noise whose spread is what the
    ledger's z claims for the sum of the three shares (z C / N per value), no more and no less."""
    from server.federation import Federation
    from server.progress import send_and_receive
    from server.secure_aggregation import SecAggPlus
    from tests.fake_grid import FakeGrid, decode

    lr = 0.5
    config = distributed_config(tiny_run_config, **{"num-server-rounds": 1, "probe-rounds": 0, "min-train-nodes": 3,
                                                    "min-evaluate-nodes": 0, "fraction-evaluate": 0.0,
                                                    "distributed-learning-rate": lr})
    added = []  # each site's share
    if not noise:
        monkeypatch.setattr("client.distributed_site.skellam_noise", lambda d, variance: np.zeros(d, np.int64))
    else:
        real = skellam.skellam_noise
        monkeypatch.setattr("client.distributed_site.skellam_noise",
                            lambda d, variance: added.append(variance) or real(d, variance))
    settings = settings_of(config)
    start = GlobalModel.load(settings).arrays()
    federation = Federation(FakeGrid(_real_sites(config, classification_csv, tmp_path)), build_strategy(settings), 1,
                            timeout=60.0, train_config={}, evaluate_config={},
                            secure=SecAggPlus(settings.secure, send_and_receive, min_updates=settings.secure_sum_minimum,
                                              distributed_step=settings.distributed_step))
    history = []
    final = decode(federation.run(start, 1, history, lambda *_: None))
    assert history and history[0].failure is None, history[0].failure
    expected, population = _clipped_gradient_mean(config, classification_csv, tmp_path, start)
    with PrivacyLedger(tmp_path / "site-1.db", read_only=True) as ledger:
        z = ledger.spends()[0].noise_multiplier
    dimensions = sum(v.size for v in expected.values())
    scale = grid_scale(dimensions, 1.0)
    deviation = np.concatenate([((final[n] - start[n].numpy()) / -lr - expected[n]).ravel() for n in expected])
    signal = np.concatenate([value.ravel() for value in expected.values()])
    assert np.abs(signal).max() > 20 / scale  # the gradient is well above the grid's resolution
    if not noise:  # rounding moves each unit's value by under one grid unit: the mean by under 1 / gamma
        assert np.abs(deviation).max() <= 1 / scale + 1e-6
    else:
        # the three shares' noise, in the mean gradient: sqrt(sum of shares) / (gamma N), N the 3 populations
        assert len(added) == 3
        assert deviation.std() == pytest.approx(math.sqrt(sum(added)) / (scale * 3 * population), rel=0.1)
        claimed = z * grid_sensitivity(dimensions) / (scale * 3 * population)  # what a site's ledger counts on
        assert claimed <= math.sqrt(sum(added)) / (scale * 3 * population) * (1 + 1e-9)


def test_the_server_steps_with_the_probe_rate_in_the_probe_rounds_only(tiny_run_config):
    settings = settings_of(distributed_config(tiny_run_config, **{
        "probe-rounds": 2, "distributed-probe-learning-rate": 7.0, "distributed-learning-rate": 0.5}))
    head, lora = "base_model.model.classifier.weight", "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    assert [settings.distributed_step(r, head) for r in (1, 2, 3)] == [7.0, 7.0, 0.5]
    assert [settings.distributed_step(r, lora) for r in (1, 2, 3)] == [0.0, 0.0, 0.5]  # noise alone while probing
    causal = settings_of(apply_overrides(distributed_config(tiny_run_config, **{"probe-rounds": 2}), {"task": "causal-lm"}))
    assert causal.distributed_step(1, lora) == causal.dp.distributed_learning_rate  # no head to probe


@pytest.mark.parametrize("value", [-1, True, 1.5, "2"])
def test_a_malformed_collusion_bound_in_the_node_config_is_refused_by_its_key(value):
    from privacy.budget import PolicyViolation, site_policy

    with pytest.raises(PolicyViolation) as refused:
        site_policy({"distributed-dp-colluders": value})
    assert refused.value.setting == "distributed-dp-colluders"
    assert site_policy({"distributed-dp-colluders": 2}).distributed_dp_colluders == 2
    assert site_policy({}).distributed_dp_colluders is None  # not opted in


def test_under_user_level_dp_each_users_gradient_is_the_mean_of_its_rows_by_autograd(
        tiny_run_config, tmp_path, monkeypatch):
    """privacy-unit-column: 36 rows of 6 patients. What the site rounds onto the grid, unit by
    unit, is each patient's mean per-row gradient, computed apart by plain autograd."""
    import pandas as pd

    from client.site import Site
    from client.training import unit_members, without_dropout
    from fedlora.tasks import collate, forward_logits, per_example_loss
    from tests.conftest import make_classification_rows

    rows = pd.DataFrame(make_classification_rows(36, seed=11))
    rows["patient"] = [f"p{i % 6}" for i in range(36)]
    csv = tmp_path / "patients.csv"
    rows.to_csv(csv, index=False)
    config = distributed_config(tiny_run_config, **{"probe-rounds": 0})
    sent = GlobalModel.load(settings_of(config)).arrays()
    node = {**node_config(csv, tmp_path, **{"distributed-dp-colluders": 0}), "num-examples": 6,
            "privacy-unit-column": "patient", "delta": 1e-3}
    captured = []
    real = distributed_dp.rounded_units

    def capture(unit_gradients, *args):
        captured.append(unit_gradients.detach().clone())
        return real(unit_gradients, *args)

    monkeypatch.setattr("client.distributed_site.rounded_units", capture)
    reply = client_app.train_site(train_message(sent), context(config, node, tmp_path), config)
    assert "status" not in reply.content.config_records, reply.content
    with PrivacyLedger(tmp_path / "l.db", read_only=True) as ledger:
        assert ledger.spends()[0].privacy_unit == "user:patient"
    site = Site(context(config, {**node, "ledger-path": str(tmp_path / "apart.db")}, tmp_path), settings_of(config))
    policy, dp = site._privacy()
    data = site._data(policy, dp)
    model, tokenizer = site._model(sent)
    encoded = site._encode(data.train, data.units(data.train), tokenizer, "training")
    params = [p for p in model.parameters() if p.requires_grad]
    expected = []
    model.train()
    with without_dropout(model):
        for members in unit_members(encoded.units):
            grads = []
            for index in members:
                model.zero_grad()
                batch = collate([encoded.examples[index]], tokenizer.pad_token_id, "classification")
                per_example_loss(forward_logits(model, batch), batch["labels"], "classification").sum().backward()
                grads.append(torch.cat([p.grad.flatten() for p in params]))
            expected.append(torch.stack(grads).mean(dim=0))
    model.zero_grad(set_to_none=True)  # the site's model is kept warm for the next test
    got = torch.cat(captured)
    assert got.shape == (len(expected), sum(p.numel() for p in params)) and len(expected) >= 3
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_a_causal_lm_site_sends_a_distributed_round_of_its_lora_gradient(tiny_llama, instruction_jsonl, tiny_run_config,
                                                                         tmp_path, monkeypatch):
    """No head, no probe phase: every round's gradient is LoRA's, on the whole adapter's grid."""
    config = distributed_config(apply_overrides(tiny_run_config, {"model": tiny_llama, "task": "causal-lm",
                                                                  "data": str(instruction_jsonl), "label-names": ""}))
    sent = GlobalModel.load(settings_of(config)).arrays()
    monkeypatch.setattr("client.distributed_site.skellam_noise", lambda d, variance: np.zeros(d, np.int64))
    node = {**node_config(instruction_jsonl, tmp_path, **{"distributed-dp-colluders": 0}), "num-examples": 60}
    reply = client_app.train_site(train_message(sent), context(config, node, tmp_path), config)
    assert "status" not in reply.content.config_records, reply.content
    upload = reply.content["fitres.parameters"]
    assert list(upload.keys()) == list(sent.keys()) and all("lora_" in name for name in upload)
    assert any(value.numpy().any() for name, value in upload.items() if ".lora_B." in name)
    with PrivacyLedger(tmp_path / "l.db", read_only=True) as ledger:
        assert ledger.spends()[0].max_grad_norm == pytest.approx(grid_sensitivity(sum(v.numpy().size for v in sent.values())))
