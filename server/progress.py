"""One round trip to the sites, with a progress bar: send a round's messages, then collect the
replies as they come, until every site answered or the round timed out.

This is what Flower's ``Grid.send_and_receive`` does, through the same public ``Grid`` calls
(``push_messages``, then ``pull_messages`` every half second while none arrives), so that a person at a terminal
sees how many sites are done and how long the rest will take. The bar is drawn only on a
terminal (tqdm's ``disable=None``): logs and captured output get none.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid
from tqdm import tqdm

PULL_INTERVAL = 0.5  # seconds, as Flower's in-memory grid polls


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float, label: str) -> list[Message]:
    """The replies that came before ``timeout``; the SuperLink's error reply about a node it lost
    comes as that node's own (see :func:`_on_behalf_of_lost_nodes`)."""
    messages = list(messages)
    if not messages:
        return []
    waiting = set(grid.push_messages(messages))
    expected = len(waiting)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    with tqdm(total=expected, desc=label, unit="site", disable=None, leave=False) as bar:
        while waiting and len(replies) < expected:
            arrived = list(grid.pull_messages(waiting))
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            replies += arrived
            bar.update(len(arrived))
            if time.monotonic() >= deadline:
                break
            if waiting and not arrived:
                time.sleep(PULL_INTERVAL)
    return _on_behalf_of_lost_nodes(messages, replies)


def _on_behalf_of_lost_nodes(sent: list[Message], replies: list[Message]) -> list[Message]:
    """A node that stops sending heartbeats gets an error reply *from the SuperLink* (source node
    1, "Node Unavailable"); make it the reply of the node it is about, so that the round records
    that site as ``failed`` (under its name) instead of an unknown node plus a ``no-reply``."""
    by_id = {m.metadata.message_id: m for m in sent if m.metadata.message_id}
    destinations = {m.metadata.dst_node_id for m in sent}
    return [
        Message(reply.error, reply_to=by_id[reply.metadata.reply_to_message_id])
        if reply.has_error() and reply.metadata.src_node_id not in destinations
        and reply.metadata.reply_to_message_id in by_id
        else reply
        for reply in replies
    ]


@dataclass
class SiteClock:
    """:func:`send_and_receive` that also adds up the seconds spent in it: the time a round
    waits on its sites, which the round's ``time_split`` in ``history.json`` separates from the
    server's own work. One clock serves every exchange of a run (SecAgg+'s stages too)."""

    waiting: float = 0.0

    def send_and_receive(self, grid: Grid, messages: Iterable[Message], timeout: float, label: str) -> list[Message]:
        start = time.perf_counter()
        try:
            return send_and_receive(grid, messages, timeout, label)
        finally:
            self.waiting += time.perf_counter() - start
