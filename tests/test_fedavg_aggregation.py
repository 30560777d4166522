"""Weighted FedAvg on adapter tensors, through the screened strategy the server uses."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.run_config import apply_overrides, default_run_config
from strategies.factory import build_strategy
from tests.conftest import settings_of

KEYS = ("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight",
        "base_model.model.classifier.bias")


@pytest.fixture(autouse=True)
def identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 99, 1


def arrays(a: float, b: float, bias: float) -> ArrayRecord:
    return ArrayRecord({
        KEYS[0]: Array(np.full((2, 4), a, dtype=np.float32)),
        KEYS[1]: Array(np.full((4, 2), b, dtype=np.float32)),
        KEYS[2]: Array(np.array([bias, -bias, 0.0], dtype=np.float32)),
    })


def reply(node_id: int, record: ArrayRecord, num_examples: int) -> Message:
    sent = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type="train")
    content = RecordDict({
        "arrays": record,
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0}),
        "site": ConfigRecord({"name": f"site-{node_id}"}),
    })
    msg = Message(content=content, reply_to=sent)
    msg.metadata.__dict__["_src_node_id"] = node_id
    return msg


def test_weighted_fedavg_matches_hand_computation():
    strategy = build_strategy(settings_of(apply_overrides(default_run_config(), {"strategy": "fedavg"})))
    strategy._reference = arrays(0.0, 0.0, 0.0)
    # Sites with 10 and 30 examples: weights 1/4 and 3/4.
    aggregated, metrics = strategy.aggregate_train(1, [reply(1, arrays(1.0, 2.0, 4.0), 10), reply(2, arrays(5.0, -2.0, 0.0), 30)])
    result = aggregated.to_numpy_ndarrays()
    expected_a = 0.25 * 1.0 + 0.75 * 5.0  # = 4.0
    expected_b = 0.25 * 2.0 + 0.75 * -2.0  # = -1.0
    np.testing.assert_allclose(result[0], np.full((2, 4), expected_a))
    np.testing.assert_allclose(result[1], np.full((4, 2), expected_b))
    np.testing.assert_allclose(result[2], [1.0, -1.0, 0.0])
    assert metrics["train-loss"] == pytest.approx(1.0)
    assert [o.outcome for o in strategy.train_outcomes] == ["aggregated", "aggregated"]
