"""A Flower Grid without Ray or a SuperLink, for driving strategies and the round loop in tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType

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

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = [self.sites[m.metadata.dst_node_id](m) for m in messages]
        self.sent += messages
        self.replies += replies
        return replies

    def train_replies(self, server_round: int) -> dict[int, Message]:
        """The training replies of one round, by node id."""
        return {
            sent.metadata.dst_node_id: reply
            for sent, reply in zip(self.sent, self.replies, strict=True)
            if sent.metadata.message_type == MessageType.TRAIN and sent.content["config"]["server-round"] == server_round
        }
