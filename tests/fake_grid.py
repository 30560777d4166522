"""A Flower Grid without Ray or a SuperLink, and sites as plain functions, for driving
strategies and the round loop in tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedlora.run_config import apply_overrides, default_run_config
from server.federation import Federation
from server.history import RoundRecord, history_json
from strategies.ffa_lora import trainable_subset

Arrays = dict[str, np.ndarray]


def record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def decode(arrays: ArrayRecord) -> Arrays:
    return {name: array.numpy() for name, array in arrays.items()}


class FakeGrid:
    """Nodes as functions from the server's message to their reply; keeps everything sent."""

    def __init__(self, sites: dict[int, Callable[[Message], Message]]) -> None:
        self.sites = sites
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._waiting: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Each site answers at once; the replies wait to be pulled, as on a SuperLink."""
        ids = []
        for message in messages:
            reply = self.sites[message.metadata.dst_node_id](message)
            self.sent.append(message)
            self.replies.append(reply)
            ids.append(str(len(self.sent)))
            self._waiting[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._waiting.pop(i) for i in list(message_ids) if i in self._waiting]

    def train_replies(self, server_round: int) -> dict[int, Message]:
        """The training replies of one round, by node id."""
        return {
            sent.metadata.dst_node_id: reply
            for sent, reply in zip(self.sent, self.replies, strict=True)
            if sent.metadata.message_type == MessageType.TRAIN and sent.content["config"]["server-round"] == server_round
        }


Update = Callable[[Arrays, int], Arrays | None]  # (what the site received, round) -> what it sends


@dataclass
class FakeSite:
    """A site that answers training with ``update`` (None: it refuses) and evaluation with fixed
    metrics, in the reply format of ``client.app``."""

    name: str
    num_examples: int
    update: Update

    def __call__(self, msg: Message) -> Message:
        metrics: dict[str, Any] = {"num-examples": self.num_examples}
        if msg.metadata.message_type == MessageType.EVALUATE:
            metrics |= {"eval-loss": 1.0, "eval-accuracy": 0.5}
            return Message(RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": self.name})}), reply_to=msg)
        sent = self.update(decode(msg.content["arrays"]), int(msg.content["config"]["server-round"]))
        if sent is None:
            status = ConfigRecord({"status": "budget-exhausted", "setting": "max-epsilon"})
            content = {"status": status, "site": ConfigRecord({"name": self.name})}
            return Message(RecordDict(content), reply_to=msg)
        metrics |= {"train-loss": 1.0}
        content = {"arrays": record(sent), "metrics": MetricRecord(metrics), "site": ConfigRecord({"name": self.name})}
        return Message(RecordDict(content), reply_to=msg)


def honest(seed: int, ffa: bool = False, scale: float = 0.01) -> Update:
    """A small random step from what was received (only B and the head under FFA-LoRA)."""

    def update(received: Arrays, server_round: int) -> Arrays:
        rng = np.random.default_rng([seed, server_round])
        kept = trainable_subset(received) if ffa else received
        return {k: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in kept.items()}

    return update


def changed(base: Update, change: Callable[[Arrays], Arrays]) -> Update:
    return lambda received, server_round: change(base(received, server_round))


def run_federation(strategy, grid: FakeGrid, arrays: Arrays, rounds: int = 2) -> tuple[Arrays, list[dict[str, Any]]]:
    """The final adapter and the history, as ``history.json`` holds it."""
    history: list[RoundRecord] = []
    federation = Federation(grid, strategy, rounds, timeout=10.0, train_config={}, evaluate_config={})
    final = federation.run(record(arrays), 1, history, lambda *_: None)
    return decode(final), history_json(history)


def outcomes(history_record: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["client"]: (c["outcome"], c["reason"]) for c in history_record["clients"]}


def server_run_config(model_dir: str, out_dir, **overrides: Any) -> dict[str, Any]:
    """The run config of a server over ``model_dir`` with two sites minimum."""
    from tests.conftest import LABELS

    return apply_overrides(default_run_config(), {
        "model": model_dir, "label-names": ",".join(LABELS), "max-seq-length": 32,
        "output-dir": str(out_dir), "min-train-nodes": 2, "min-evaluate-nodes": 2, **overrides,
    })
