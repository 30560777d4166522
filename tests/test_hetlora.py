"""Heterogeneous LoRA ranks (``strategy = "hetlora"``): each node gets an adapter of its own rank
from round 2 on, rank-aware aggregation checked by hand, rank-flexible screening, the site's own
truncation, a saved rank-R adapter that PEFT loads, and one real Ray simulation with sites of
rank 4, 8 and 16."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft.utils import get_peft_model_state_dict

from client import app as client_app
from fedlora.run_config import apply_overrides, default_run_config
from fedlora.saved_adapter import load_adapter
from server.global_model import GlobalModel
from simulations.simulate import run_simulation
from strategies.factory import build_strategy
from fedlora.lora_ranks import is_lora_a, lora_rank_of, pad_to_rank, rank_axis, truncate_to_rank
from tests.fake_grid import FakeGrid, decode, record, run_federation
from tests.conftest import LABELS, settings_of

Arrays = dict[str, np.ndarray]
GLOBAL_RANK = 8




def rank_site(rank: int, num_examples: int, seed: int, tamper: Callable[[Arrays], Arrays] = lambda a: a) -> Callable[[Message], Message]:
    """A site of LoRA rank ``rank``: like ``client.site``, it truncates a larger adapter itself."""

    def reply(msg: Message) -> Message:
        name = ConfigRecord({"name": f"rank-{rank}-{seed}"})
        if msg.metadata.message_type == MessageType.EVALUATE:
            metrics = MetricRecord({"num-examples": num_examples, "eval-loss": 1.0, "eval-accuracy": 0.5})
            return Message(RecordDict({"metrics": metrics, "site": name}), reply_to=msg)
        received = decode(msg.content["arrays"])
        own = truncate_to_rank(received, rank) if lora_rank_of(received) > rank else received
        rng = np.random.default_rng([seed, int(msg.content["config"]["server-round"])])
        sent = tamper({k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in own.items()})
        metrics = MetricRecord({"num-examples": num_examples, "train-loss": 1.0, "lora-rank": rank})
        return Message(RecordDict({"arrays": record(sent), "metrics": metrics, "site": name}), reply_to=msg)

    return reply


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1


@pytest.fixture(scope="module")
def config(tiny_bert, tmp_path_factory) -> dict[str, Any]:
    return apply_overrides(default_run_config(), {
        "model": tiny_bert, "label-names": ",".join(LABELS), "max-seq-length": 32, "strategy": "hetlora",
        "lora-rank": GLOBAL_RANK, "output-dir": str(tmp_path_factory.mktemp("out")),
        "min-train-nodes": 2, "min-evaluate-nodes": 2,
    })


@pytest.fixture(scope="module")
def initial(config) -> Arrays:
    return decode(GlobalModel.load(settings_of(config)).arrays())


def test_nodes_get_their_own_rank_from_round_2_and_aggregation_is_rank_aware(config, initial, tmp_path):
    ranks, weights = {1: 2, 2: 4, 3: 8}, {1: 10, 2: 30, 3: 60}
    grid = FakeGrid({n: rank_site(r, weights[n], seed=n) for n, r in ranks.items()})

    final, history = run_federation(build_strategy(settings_of(config)), grid, initial, rounds=2)

    assert all(c["outcome"] == "aggregated" for entry in history for c in entry["clients"])
    received = [(int(m.content["config"]["server-round"]), m.metadata.message_type, m.metadata.dst_node_id,
                 lora_rank_of(decode(m.content["arrays"]))) for m in grid.sent]
    for server_round, kind, node, rank in received:
        first_contact = server_round == 1 and kind == MessageType.TRAIN
        assert rank == (GLOBAL_RANK if first_contact else ranks[node]), (server_round, kind, node, rank)
    down = {c["node_id"]: c["bytes_down"] for c in history[1]["clients"]}
    assert down == {n: record(truncate_to_rank(initial, r)).count_bytes() for n, r in ranks.items()}

    # Round 2 by hand: component k of A (row k) and B (column k) is the weighted mean over the
    # sites whose rank exceeds k; the head is the weighted mean over all sites.
    replies = {r.metadata.src_node_id: decode(r.content["arrays"]) for r in grid.replies[-6:]
               if r.metadata.message_type == MessageType.TRAIN}
    for name in initial:
        axis = rank_axis(name)
        if axis is None:
            expected = sum(weights[n] * replies[n][name].astype(np.float64) for n in ranks) / 100
            np.testing.assert_allclose(final[name], expected, rtol=1e-5, atol=1e-7)
            continue
        for k in range(GLOBAL_RANK):
            trained = [n for n in ranks if ranks[n] > k]
            total = sum(weights[n] for n in trained)
            expected = sum(weights[n] * replies[n][name].take(k, axis).astype(np.float64) for n in trained) / total
            np.testing.assert_allclose(final[name].take(k, axis), expected, rtol=1e-5, atol=1e-7)

    global_model = GlobalModel.load(settings_of(config))
    global_model.set_arrays(record(final))
    model, _ = load_adapter(global_model.save(tmp_path / "adapter"), base_model=config["model"])  # PeftModel.from_pretrained
    assert model.peft_config["default"].r == GLOBAL_RANK
    loaded = get_peft_model_state_dict(model)
    assert all(np.array_equal(loaded[k].numpy(), final[k]) for k in final)


def test_screening_is_rank_flexible_but_bounded_by_the_global_rank(config, initial):
    def inconsistent(arrays: Arrays) -> Arrays:
        return {k: (v[:2] if is_lora_a(k) else v) for k, v in arrays.items()}

    grid = FakeGrid({
        1: rank_site(2, 10, seed=1),
        2: rank_site(8, 10, seed=2, tamper=lambda a: pad_to_rank(a, 16)),
        3: rank_site(4, 10, seed=3, tamper=inconsistent),
    })
    _, history = run_federation(build_strategy(settings_of(config)), grid, initial, rounds=1)
    seen = {c["node_id"]: (c["outcome"], c["reason"]) for c in history[0]["clients"]}
    assert seen[1] == ("aggregated", "")
    assert seen[2][0] == "rejected" and "invalid LoRA rank 16" in seen[2][1]
    assert seen[3][0] == "rejected" and "inconsistent LoRA ranks" in seen[3][1]


def test_a_site_trains_at_its_own_rank_and_refuses_a_smaller_adapter(tiny_run_config, classification_csv, tmp_path):
    run_config = apply_overrides(tiny_run_config, {"strategy": "hetlora", "lora-rank": GLOBAL_RANK, "dp": False, "local-steps": 2})
    sent = GlobalModel.load(settings_of(run_config)).arrays()

    def train_at(rank: int) -> Message:
        node = {"data-path": str(classification_csv), "dp": False, "lora-rank": rank, "ledger-path": str(tmp_path / f"{rank}.db")}
        context = Context(run_id=1234, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)
        msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type="train")
        return client_app.app(msg, context)

    reply = train_at(4)
    assert lora_rank_of(decode(reply.content["arrays"])) == 4 and reply.content["metrics"]["lora-rank"] == 4
    refused = train_at(16)
    assert dict(refused.content["status"]) == {"status": "model-error", "setting": "lora-rank"}


def test_simulation_with_sites_of_rank_4_8_16(tiny_run_config):
    run_config = apply_overrides(tiny_run_config, {
        "strategy": "hetlora", "lora-rank": 16, "num-server-rounds": 2, "local-steps": 2, "noise-multiplier": 1.0,
    })
    ranks = {"site-0": 4, "site-1": 8, "site-2": 16}
    initial = decode(GlobalModel.load(settings_of(run_config)).arrays())
    out = run_simulation(settings_of(run_config), 3, per_site={0: {"lora-rank": 4}, 1: {"lora-rank": 8}})

    history = json.loads((out / "history.json").read_text())
    at_rank = {site: record(truncate_to_rank(initial, r)).count_bytes() for site, r in ranks.items()}
    for server_round, entry in enumerate(history, start=1):
        assert entry["failure"] is None
        assert sorted(c["client"] for c in entry["clients"] if c["outcome"] == "aggregated") == sorted(ranks)
        assert {e["outcome"] for e in entry["evaluations"]} == {"evaluated"}
        for client in entry["clients"]:
            assert client["bytes_up"] == at_rank[client["client"]], "each site trains and sends its own rank"
            full = at_rank["site-2"]
            assert client["bytes_down"] == (full if server_round == 1 else at_rank[client["client"]])

    model, _ = load_adapter(out / "adapter", base_model=run_config["model"])  # PeftModel.from_pretrained
    assert model.peft_config["default"].r == 16
    saved = {k: v.numpy() for k, v in get_peft_model_state_dict(model).items()}
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in initial.items()}
    assert all(np.isfinite(v).all() for v in saved.values())
    lora_b = [k for k in saved if rank_axis(k) == 1]
    # Components 8..15 only site-2 trained, 0..3 every site: both moved away from B = 0.
    assert all(np.abs(saved[k][:, :4]).sum() > 0 and np.abs(saved[k][:, 8:]).sum() > 0 for k in lora_b)
