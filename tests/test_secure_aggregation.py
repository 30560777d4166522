"""SecAgg+ on the Message API (``server.secure_aggregation`` with Flower's client mod through
``client.secure_aggregation``): the server gets the weighted mean of the updates and nothing
from which one update could be read; dropouts after key sharing and during unmasking are
survived; too many end the round with the global adapter unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from client.outgoing_guard import DisclosureError, check_outgoing, outgoing_guard
from client.secure_aggregation import masked_upload, secure_aggregation
from fedlora.run_config import ConfigError, RunSettings, apply_overrides, default_run_config
from fedlora.secagg_grid import LEVELS as QUANTIZATION_RANGE
from fedlora.secagg_grid import MODULUS
from server.federation import Federation
from server.history import history_json
from server.secure_aggregation import SecAggPlus
from server.progress import send_and_receive
from strategies.factory import build_strategy
from tests.fake_grid import FakeGrid, FakeSite, decode, honest, record, run_federation

@pytest.fixture(autouse=True)
def _server_process():
    """Messages are made as in a ServerApp's process, which Flower identifies."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


SHAPES = {"layer.lora_A.weight": (4, 64), "layer.lora_B.weight": (64, 4), "classifier.weight": (3, 64)}


def _settings(**overrides) -> RunSettings:
    return RunSettings.parse(apply_overrides(default_run_config(), {"secure-aggregation": True, **overrides}))


class SecureSite:
    """A site's training, answering as ``client.app.train_site`` does in a secure round: its
    ``delta`` at ``weight`` (or a refusal: zero at weight 0)."""

    def __init__(self, node_id: int, delta: dict[str, np.ndarray], weight: float, fail_at: str = "", refuse: bool = False):
        self.delta, self.weight, self.fail_at, self.refuse = delta, weight, fail_at, refuse
        self.context = Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={})

    def train(self, msg: Message, context: Context) -> Message:
        received = msg.content["arrays"]
        if self.refuse:
            content = masked_upload({}, received, 0.0, 0.0)
            content["status"] = ConfigRecord({"status": "budget-exhausted", "setting": "max-epsilon"})
        else:
            sent = {name: array.numpy() + self.delta[name] for name, array in received.items()}
            content = masked_upload(sent, received, self.weight, 0.0)
            content["metrics"] = MetricRecord({"num-examples": self.weight, "train-loss": 1.0})
        content["site"] = ConfigRecord({"name": f"site-{self.context.node_id}"})
        return Message(content, reply_to=msg)


def _site(node_id: int, delta, weight: float, wire: dict[int, list[bytes]] | None = None, **kwargs):
    """The site behind the real mods (outgoing guard, then SecAgg+); ``fail_at`` names the
    protocol stage at which its process breaks down; ``wire`` keeps a copy of the masked vector
    it sends (what the server receives)."""
    site = SecureSite(node_id, delta, weight, **kwargs)

    def answer(msg: Message) -> Message:
        stage = msg.content[RECORD_KEY_CONFIGS][Key.STAGE]
        if stage == site.fail_at:
            def broken(m, c):
                raise RuntimeError("the site's process died")
            return outgoing_guard(msg, site.context, broken)
        reply = outgoing_guard(msg, site.context, lambda m, c: secure_aggregation(m, c, site.train))
        if wire is not None and not reply.has_error() and Key.MASKED_PARAMETERS in reply.content.config_records.get(RECORD_KEY_CONFIGS, {}):
            wire[node_id] = list(reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
        return reply

    return answer


def _deltas(count: int, seed: int = 0, scale: float = 0.01) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in SHAPES.items()} for _ in range(count)]


def _train_messages(node_ids: list[int], global_arrays: dict[str, np.ndarray], server_round: int = 1) -> list[Message]:
    return [Message(RecordDict({"arrays": record(global_arrays), "config": ConfigRecord({"server-round": server_round})}),
                    dst_node_id=nid, message_type="train") for nid in node_ids]


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def _weighted_mean(deltas, weights) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {name: sum(w * d[name] for w, d in zip(weights, deltas, strict=True)) / total for name in SHAPES}


def _run(sites: dict[int, object], settings: RunSettings | None = None):
    grid = FakeGrid(sites)
    protocol = SecAggPlus((settings or _settings()).secure, send_and_receive)
    result = protocol.run(grid, _train_messages(sorted(sites), _global()), timeout=10.0, label="test")
    return result, grid


def test_the_server_gets_the_weighted_mean_of_the_updates():
    deltas, weights = _deltas(4), [120.0, 300.0, 80.0, 500.0]
    result, _ = _run({10 + i: _site(10 + i, d, w) for i, (d, w) in enumerate(zip(deltas, weights, strict=True))})
    assert result.failure == "" and result.summed == {10, 11, 12, 13}
    expected = _weighted_mean(deltas, weights)
    for name in SHAPES:
        np.testing.assert_allclose(result.mean_update[name], expected[name], atol=2e-4)
    assert result.total_weight == pytest.approx(sum(weights), rel=1e-4)


def _best_correlation(values: list[np.ndarray], delta: dict[str, np.ndarray]) -> float:
    """How well a vector the server holds reads as a site's update: the correlation of its
    dequantized values with the update, over every value."""
    flat = np.concatenate([v.ravel().astype(np.float64) for v in values[-len(delta):]])
    target = np.concatenate([d.ravel() for d in delta.values()]).astype(np.float64)
    return abs(float(np.corrcoef(flat, target)[0, 1]))


def test_the_server_never_holds_an_unmasked_update():
    """The attack: read every site's update off what the server holds, by correlating each
    vector (as received, and dequantized as one site's) with the site's true update. On a
    plain round's replies it finds every update; under SecAgg+ it finds none."""
    deltas, weights = _deltas(3, seed=1, scale=0.2), [200.0, 200.0, 200.0]
    plain = {i: d for i, d in enumerate(deltas)}
    assert all(_best_correlation(list(d.values()), plain[i]) > 0.99 for i, d in plain.items())  # the detector works

    wire: dict[int, list[bytes]] = {}
    sites = {20 + i: _site(20 + i, d, w, wire) for i, (d, w) in enumerate(zip(deltas, weights, strict=True))}
    result, _ = _run(sites, _settings(**{"secagg-clipping-range": 1.0}))
    assert result.mean_update is not None and set(wire) == {20, 21, 22}
    for nid, sent in wire.items():
        vector = [bytes_to_ndarray(b) for b in sent]
        # uint32 on the wire: the bytes of an fp32 adapter (plus the weight), not int64's twice that
        assert all(v.dtype == np.uint32 for v in vector)
        assert sum(len(b) for b in sent) < 1.02 * sum(d.nbytes for d in deltas[nid - 20].values()) + 1024
        delta = deltas[nid - 20]
        assert _best_correlation(vector, delta) < 0.1
        scaled = dequantize([np.mod(v.astype(np.int64), MODULUS) for v in vector[1:]], 1.0, QUANTIZATION_RANGE)
        assert _best_correlation(scaled, delta) < 0.1
    # and what the round kept for the report holds no vector at all
    for reply in result.replies:
        assert RECORD_KEY_CONFIGS not in reply.content.config_records and not reply.content.array_records


def test_a_site_that_drops_after_sharing_keys_leaves_the_round_to_the_rest():
    deltas, weights = _deltas(5, seed=2), [100.0, 200.0, 300.0, 400.0, 500.0]
    sites = {30 + i: _site(30 + i, d, w, fail_at=Stage.COLLECT_MASKED_VECTORS if i == 2 else "")
             for i, (d, w) in enumerate(zip(deltas, weights, strict=True))}
    result, _ = _run(sites)
    assert result.failure == "" and result.summed == {30, 31, 33, 34}
    assert result.dropped == {32: "collect masked vectors"}
    survivors = [0, 1, 3, 4]
    expected = _weighted_mean([deltas[i] for i in survivors], [weights[i] for i in survivors])
    for name in SHAPES:
        np.testing.assert_allclose(result.mean_update[name], expected[name], atol=2e-4)


def test_a_site_that_drops_while_unmasking_still_counts():
    deltas, weights = _deltas(4, seed=3), [100.0, 100.0, 100.0, 100.0]
    sites = {i: _site(i, d, w, fail_at=Stage.UNMASK if i == 1 else "") for i, (d, w) in enumerate(zip(deltas, weights, strict=True), 1)}
    result, _ = _run(sites)
    assert result.summed == {1, 2, 3, 4}
    expected = _weighted_mean(deltas, weights)
    for name in SHAPES:
        np.testing.assert_allclose(result.mean_update[name], expected[name], atol=2e-4)


def _secure_federation(sites: dict, rounds: int = 1, **overrides) -> tuple[dict[str, np.ndarray], list[dict]]:
    """``rounds`` SecAgg+ rounds of the round loop over ``sites``, from the test's global adapter:
    the final adapter and ``history.json``'s records."""
    settings = _settings(**{"min-train-nodes": len(sites), "min-evaluate-nodes": 0, "fraction-evaluate": 0.0, **overrides})
    federation = Federation(FakeGrid(sites), build_strategy(settings), rounds, timeout=10.0, train_config={},
                            evaluate_config={}, secure=SecAggPlus(settings.secure, send_and_receive))
    history = []
    final = federation.run(record(_global()), 1, history, lambda *_: None)
    return decode(final), history_json(history)


def test_the_round_loop_counts_secaggs_four_exchanges_as_waiting_on_the_sites(monkeypatch):
    """Each pull from the grid takes 0.1 s: the four SecAgg+ stages' waits land in the round's
    ``sites-training``, not in the server's own work, even though SecAggPlus was given the
    plain send_and_receive (the round loop times every exchange it drives)."""
    import time

    pull = FakeGrid.pull_messages

    def slow_pull(self, message_ids):
        time.sleep(0.1)
        return pull(self, message_ids)

    monkeypatch.setattr(FakeGrid, "pull_messages", slow_pull)
    sites = {i: _site(i, d, 100.0) for i, d in enumerate(_deltas(3, seed=9), 1)}
    _, (entry,) = _secure_federation(sites)
    split = entry["time_split"]
    assert split["sites-training"] >= 0.4 and split["server"] < split["sites-training"] / 2
    assert sum(split.values()) == pytest.approx(entry["seconds"])


def test_too_many_dropouts_fail_the_round_and_keep_the_global_adapter():
    deltas = _deltas(3, seed=4)
    sites = {i: _site(i, d, 100.0, fail_at=Stage.COLLECT_MASKED_VECTORS if i > 1 else "") for i, d in enumerate(deltas, 1)}
    final, (entry,) = _secure_federation(sites)
    for name, value in final.items():
        np.testing.assert_array_equal(value, _global()[name])
    assert "secure aggregation stopped" in entry["failure"]
    assert sorted(c["outcome"] for c in entry["clients"]) == ["failed", "failed", "valid"]  # site-1's update was fine


def test_a_refusing_site_adds_nothing_and_is_reported_refused():
    deltas, weights = _deltas(3, seed=5), [100.0, 300.0, 200.0]
    sites = {i: _site(i, d, w, refuse=i == 3) for i, (d, w) in enumerate(zip(deltas, weights, strict=True), 1)}
    final, (entry,) = _secure_federation(sites)
    expected = _weighted_mean(deltas[:2], weights[:2])
    for name in SHAPES:
        np.testing.assert_allclose(final[name], _global()[name] + expected[name], atol=2e-4)
    outcomes = {c["client"]: c["outcome"] for c in entry["clients"]}
    assert outcomes == {"site-1": "aggregated", "site-2": "aggregated", "site-3": "refused"}
    assert entry["secure_aggregation"]["summed"] == 3 and entry["secure_aggregation"]["dropped"] == 0
    assert all(c["bytes_up"] > 0 and c["update_norm"] is None for c in entry["clients"])


@pytest.mark.parametrize(("overrides", "setting"), [
    ({"strategy": "median"}, "strategy"),
    ({"strategy": "fedadam"}, "strategy"),
    ({"strategy": "hetlora"}, "strategy"),
    ({"central-dp": True, "num-sampled-clients": 2}, "central-dp"),
    ({"upload-dtype": "int8"}, "upload-dtype"),
])
def test_what_needs_each_update_is_refused_by_its_key(overrides, setting):
    with pytest.raises(ConfigError) as refused:
        build_strategy(_settings(**overrides))
    assert refused.value.setting == setting


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "ffa-lora", "ffa-lora+fedprox"])
def test_the_plain_means_run_under_secure_aggregation(strategy):
    build_strategy(_settings(strategy=strategy))


def test_the_guard_lets_no_update_out_unmasked_in_a_secure_round():
    received = record(_global())
    incoming = Message(RecordDict({"arrays": received}), dst_node_id=1, message_type="train")
    masked = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: [b"\x00"]}), "arrays": received})
    with pytest.raises(DisclosureError, match="masked"):
        check_outgoing(Message(masked, reply_to=incoming), received)
    extra = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: [b"\x00"], "loss": 0.3})})
    with pytest.raises(DisclosureError, match="no stage"):
        check_outgoing(Message(extra, reply_to=incoming), received)
    wrong_type = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.PUBLIC_KEY_1: b"k", Key.PUBLIC_KEY_2: [b"k"]})})
    with pytest.raises(DisclosureError, match="pk2"):
        check_outgoing(Message(wrong_type, reply_to=incoming), received)
    # the update itself, as floats in the masked vector's place
    plain = [ndarray_to_bytes(np.ones(1))] + [ndarray_to_bytes(a.numpy()) for a in received.values()]
    unmasked = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: plain})})
    with pytest.raises(DisclosureError, match="integers"):
        check_outgoing(Message(unmasked, reply_to=incoming), received)


def test_an_honest_site_bounds_its_update_before_masking():
    received = record(_global())
    sent = {name: array.numpy() + 3.0 for name, array in received.items()}
    bounded = decode(masked_upload(sent, received, 10.0, norm_bound=0.5)["fitres.parameters"])
    assert np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in bounded.values())) == pytest.approx(0.5, rel=1e-5)


def test_a_federation_runs_secure_rounds_and_records_them():
    deltas = _deltas(3, seed=6)
    sites = {i: _site(i, d, 100.0) for i, d in enumerate(deltas, 1)}
    _, history = _secure_federation(sites, rounds=2, **{"min-train-nodes": 2})
    for entry in history:
        assert entry["failure"] is None
        assert entry["secure_aggregation"] == {"sites": 3, "summed": 3, "dropped": 0, "shares": 3, "threshold": 2,
                                               "clipping_range": 1.0}


def test_run_federation_without_secure_aggregation_records_none():
    grid = FakeGrid({i: FakeSite(f"site-{i}", 10, honest(i)) for i in (1, 2)})
    settings = RunSettings.parse(default_run_config())
    _, history = run_federation(build_strategy(settings), grid, _global(), rounds=1)
    assert history[0]["secure_aggregation"] is None


def test_with_fewer_shares_each_site_masks_with_its_neighbours_only_and_the_mean_holds():
    """SecAgg+'s point: secagg-shares bounds the keys each site agrees (here 5 of 9 sites)."""
    deltas, weights = _deltas(9, seed=8), [float(100 + 10 * i) for i in range(9)]
    sites = {i: _site(i, d, w, fail_at=Stage.COLLECT_MASKED_VECTORS if i == 4 else "")
             for i, (d, w) in enumerate(zip(deltas, weights, strict=True), 1)}
    grid = FakeGrid(sites)
    result = SecAggPlus(_settings(**{"secagg-shares": 0.5}).secure, send_and_receive).run(
        grid, _train_messages(sorted(sites), _global()), timeout=10.0, label="test")
    assert (result.num_shares, result.threshold) == (5, 3)
    # the share-keys stage sends each site public keys by node id: its own and its four neighbours'
    shared_keys = [sum(key.isdigit() for key in sent.content[RECORD_KEY_CONFIGS]) for sent in grid.sent]
    assert sorted(n for n in shared_keys if n) == [5] * 9
    kept = [i for i in range(9) if i != 3]
    expected = _weighted_mean([deltas[i] for i in kept], [weights[i] for i in kept])
    for name in SHAPES:
        np.testing.assert_allclose(result.mean_update[name], expected[name], atol=2e-4)


def _unmask_requests(grid: FakeGrid) -> int:
    return sum(Key.ACTIVE_NODE_ID_LIST in sent.content[RECORD_KEY_CONFIGS] for sent in grid.sent)


def test_a_sum_of_one_update_and_refusals_is_never_unmasked():
    """The attack: every site but one refuses (a zero update at weight 0), so that the mean
    would be that one site's update. The sum stays masked and the round fails."""
    deltas = _deltas(3, seed=9)
    sites = {i: _site(i, d, 100.0, refuse=i > 1) for i, d in enumerate(deltas, 1)}
    result, grid = _run(sites)
    assert result.mean_update is None and "1 update(s) in the sum, fewer than 2" in result.failure
    assert _unmask_requests(grid) == 0


def test_a_site_left_with_one_hidden_mask_is_never_unmasked():
    """Flower's masks come from 32-bit seeds: with 3 sites and one lost after sharing its keys,
    the server would learn the lost site's masks and each survivor would keep only one hidden
    pairwise mask. The sum stays masked."""
    deltas = _deltas(3, seed=10)
    sites = {i: _site(i, d, 100.0, fail_at=Stage.COLLECT_MASKED_VECTORS if i == 3 else "") for i, d in enumerate(deltas, 1)}
    result, grid = _run(sites)
    assert result.mean_update is None and "fewer than 2 other sites of the sum" in result.failure
    assert _unmask_requests(grid) == 0


def test_a_site_copying_another_public_key_takes_both_out_and_the_rest_go_on():
    deltas, weights = _deltas(5, seed=11), [100.0] * 5
    honest_sites = {i: _site(i, d, w) for i, (d, w) in enumerate(zip(deltas, weights, strict=True), 1)}
    keys: dict[int, bytes] = {}

    def copying(msg: Message) -> Message:
        reply = honest_sites[5](msg)
        record = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if Key.PUBLIC_KEY_1 in record:
            record[Key.PUBLIC_KEY_1] = keys[4]
        return reply

    def recording(msg: Message) -> Message:
        reply = honest_sites[4](msg)
        if Key.PUBLIC_KEY_1 in reply.content.config_records.get(RECORD_KEY_CONFIGS, {}):
            keys[4] = reply.content[RECORD_KEY_CONFIGS][Key.PUBLIC_KEY_1]
        return reply

    result, _ = _run({**honest_sites, 4: recording, 5: copying})
    assert result.dropped == {4: "setup (unusable public keys)", 5: "setup (unusable public keys)"}
    expected = _weighted_mean(deltas[:3], weights[:3])
    for name in SHAPES:
        np.testing.assert_allclose(result.mean_update[name], expected[name], atol=2e-4)


def test_a_site_answers_the_key_stages_without_loading_its_training_stack():
    """A deployed site starts a ClientApp process per message; the key, share and unmask stages
    of a SecAgg+ round must not pay for importing torch, transformers, peft and Opacus."""
    import subprocess
    import sys

    script = """
import json, sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity
from client.app import app
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 1.0,
         Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1000.0}
msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(setup)}), dst_node_id=5, message_type="train")
context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
reply = app(msg, context)
assert Key.PUBLIC_KEY_1 in reply.content[RECORD_KEY_CONFIGS], reply.content
print(json.dumps(sorted(m for m in ("torch", "transformers", "peft", "opacus") if m in sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [], done.stdout
