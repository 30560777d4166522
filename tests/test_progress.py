"""A round trip to the sites with a progress bar (server.progress): every reply collected as it
arrives, the timeout honoured, and a bar only on a terminal."""

from __future__ import annotations

import io
import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server import progress


class TrickleGrid:
    """Replies become available one per pull; ``silent`` nodes never answer."""

    def __init__(self, silent: tuple[int, ...] = ()) -> None:
        self.silent, self.pulls, self._pending = silent, 0, {}

    def push_messages(self, messages):
        ids = []
        for message in messages:
            ids.append(str(len(self._pending)))
            if message.metadata.dst_node_id not in self.silent:
                self._pending[ids[-1]] = Message(RecordDict({"c": ConfigRecord({"n": message.metadata.dst_node_id})}),
                                                 reply_to=message)
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        ready = [i for i in ids if i in self._pending][:1]
        return [self._pending.pop(i) for i in ready]


def messages(nodes):
    return [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train") for n in nodes]


@pytest.fixture(autouse=True)
def fast_pulls(monkeypatch):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1
    monkeypatch.setattr(progress, "PULL_INTERVAL", 0.01)


def test_every_reply_is_collected_as_it_arrives():
    grid = TrickleGrid()
    replies = progress.send_and_receive(grid, messages([1, 2, 3]), timeout=10.0, label="round 1/2 training")
    assert sorted(r.content["c"]["n"] for r in replies) == [1, 2, 3] and grid.pulls == 3


def test_a_site_that_never_answers_ends_the_wait_at_the_timeout():
    start = time.monotonic()
    replies = progress.send_and_receive(TrickleGrid(silent=(2,)), messages([1, 2, 3]), timeout=0.3, label="r")
    assert sorted(r.content["c"]["n"] for r in replies) == [1, 3] and time.monotonic() - start < 2.0


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_drawn_on_a_terminal_only(monkeypatch):
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        progress.send_and_receive(TrickleGrid(), messages([1, 2]), timeout=10.0, label="round 1/2 training")
        text = stream.getvalue()
        assert ("round 1/2 training" in text and "/2 [" in text) == drawn, text


def test_a_round_splits_its_seconds_into_waiting_on_sites_and_the_servers_own_work(tiny_bert, tmp_path, monkeypatch):
    """Sites that take 0.3 s to answer a training message and 0.1 s an evaluation, and a server
    whose aggregation takes 0.2 s: ``time_split`` puts each where it was spent, and the parts add
    up to the round's seconds."""
    from server.global_model import GlobalModel
    from strategies.factory import build_strategy
    from tests.conftest import settings_of
    from tests.fake_grid import FakeGrid, FakeSite, decode, honest, run_federation, server_run_config

    class SlowGrid(FakeGrid):
        def pull_messages(self, message_ids):
            replies = list(super().pull_messages(message_ids))
            time.sleep(0.3 if any(r.metadata.message_type == "train" for r in replies) else 0.1)
            return replies

    config = server_run_config(tiny_bert, tmp_path)
    strategy = build_strategy(settings_of(config))
    aggregate_train = strategy.aggregate_train

    def slow_aggregation(*args):
        time.sleep(0.2)
        return aggregate_train(*args)

    monkeypatch.setattr(strategy, "aggregate_train", slow_aggregation)
    initial = decode(GlobalModel.load(settings_of(config)).arrays())
    sites = {n: FakeSite(f"site-{n}", 100, honest(n)) for n in (1, 2)}
    _, history = run_federation(strategy, SlowGrid(sites), initial, rounds=1)
    split = history[0]["time_split"]
    assert 0.3 <= split["sites-training"] < 0.5 and 0.1 <= split["sites-evaluation"] < 0.3
    assert 0.2 <= split["server"] < 0.6
    assert sum(split.values()) == pytest.approx(history[0]["seconds"])
