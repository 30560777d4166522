"""The round loop: train, screen and aggregate, evaluate, checkpoint.

Flower's ``Strategy.start`` runs rounds 1..N in one go. fedlora drives the same strategy
methods (``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` /
``aggregate_evaluate``) itself, because a resumed run starts at round k+1 and every round must
be checkpointed and reported before the next one begins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.history import RoundRecord, SiteEvaluation, SiteRound
from server.progress import SiteClock
from server.secure_aggregation import SecAggPlus
from strategies.screening import ReplyOutcome, ScreenedStrategy
from strategies.validation import TooFewUpdates

# The DP parameters a site reports with its update, kept in its history entry (``privacy``).
_PRIVACY_METRICS = ("noise-multiplier", "sample-rate", "steps", "delta", "max-epsilon", "dp", "user-level")
RoundCallback = Callable[[int, ArrayRecord, list[RoundRecord]], None]


@dataclass
class Federation:
    grid: Grid
    strategy: ScreenedStrategy
    num_rounds: int
    timeout: float
    train_config: dict[str, Any]
    evaluate_config: dict[str, Any]
    central_eval: Callable[[ArrayRecord], dict[str, float]] | None = None
    secure: SecAggPlus | None = None  # SecAgg+: the server gets only each round's masked sum
    clock: SiteClock = field(default_factory=SiteClock)  # every exchange with the sites, SecAgg+'s too
    flag_after: int = 3  # flag a site whose update was rejected in this many rounds running (0: never)
    # node id -> site-name, learnt from the sites' replies: a site that stops answering (no-reply,
    # or a Flower error reply, which carries no site record) is still reported under its name.
    site_names: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.secure is not None:  # SecAgg+'s four exchanges are waiting on the sites too
            self.secure = replace(self.secure, send_and_receive=self.clock.send_and_receive)

    def run(self, arrays: ArrayRecord, start_round: int, history: list[RoundRecord], on_round: RoundCallback) -> ArrayRecord:
        for record in history:  # a resumed run knows the sites from the rounds before
            self._learn_names([*record.clients, *record.evaluations])
        self.strategy.restore(history)  # a resumed run's central-DP spend counts the earlier rounds
        for server_round in range(start_round, self.num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, self.num_rounds)
            arrays, record = self._round(server_round, arrays)
            history.append(record)
            self._flag_repeated_rejections(history)
            for entry in record.clients:
                _log_outcome(server_round, entry)
            on_round(server_round, arrays, history)
            log(INFO, "round %s: eval accuracy %s, train loss %s, %s/%s sites aggregated", server_round,
                _fmt(record.eval_accuracy), _fmt(record.train_loss), len(record.aggregated), len(record.clients))
        return arrays

    def _round(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, RoundRecord]:
        start = time.perf_counter()
        messages = list(self.strategy.configure_train(server_round, arrays, ConfigRecord(dict(self.train_config)), self.grid))
        bytes_down = {m.metadata.dst_node_id: m.content["arrays"].count_bytes() for m in messages}
        label = f"round {server_round}/{self.num_rounds} training"
        failure, train_metrics, secure_summary = None, None, None
        waited = self.clock.waiting
        try:
            if self.secure is None:
                replies = self.clock.send_and_receive(self.grid, messages, self.timeout, label)
                new_arrays, train_metrics = self.strategy.aggregate_train(server_round, replies)
            else:
                secure_round = self.secure.run(self.grid, messages, self.timeout, label)
                secure_summary = secure_round.summary(self.secure.settings.secagg_clipping_range)
                new_arrays, train_metrics = self.strategy.aggregate_secure(server_round, secure_round)
            if new_arrays is not None:
                arrays = new_arrays
        except TooFewUpdates as err:
            failure = str(err)
            log(WARNING, "%s; the global adapter is unchanged", failure)
            for outcome in self.strategy.train_outcomes:
                if outcome.outcome == "aggregated":  # a valid update, but its round was not aggregated
                    outcome.outcome, outcome.reason = "valid", "round not aggregated (min-valid-updates)"
        clients = _client_entries(self.strategy.train_outcomes, bytes_down)
        self._learn_names(clients)

        eval_messages = list(self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(self.evaluate_config)), self.grid))
        training, waited = self.clock.waiting - waited, self.clock.waiting
        eval_replies = self.clock.send_and_receive(self.grid, eval_messages, self.timeout,
                                                   f"round {server_round}/{self.num_rounds} evaluation")
        evaluation = self.clock.waiting - waited
        eval_metrics = self.strategy.aggregate_evaluate(server_round, eval_replies)
        central = self.central_eval(arrays) if self.central_eval else {}
        seconds = time.perf_counter() - start
        record = RoundRecord(
            round=server_round,
            train_loss=(train_metrics or {}).get("train-loss"),
            eval_loss=(eval_metrics or {}).get("eval-loss"),
            eval_accuracy=(eval_metrics or {}).get("eval-accuracy"),
            central_loss=central.get("loss"),
            central_accuracy=central.get("accuracy"),
            bytes_up=sum(c.bytes_up for c in clients),
            bytes_down=sum(bytes_down.values()),
            seconds=seconds,
            time_split={"sites-training": training, "sites-evaluation": evaluation,
                        "server": seconds - training - evaluation},
            failure=failure,
            central_epsilon=self.strategy.central_epsilon,
            central_dp=self.strategy.central_release(),
            secure_aggregation=secure_summary,
            clients=clients,
            evaluations=[
                SiteEvaluation(o.site, o.node_id, o.outcome, o.reason, num_examples=o.metrics.get("num-examples"),
                               eval_loss=o.metrics.get("eval-loss"), eval_accuracy=o.metrics.get("eval-accuracy"),
                               epsilon=o.metrics.get("epsilon"), ledger=o.ledger)
                for o in self.strategy.evaluate_outcomes
            ],
        )
        self._learn_names(record.evaluations)
        for entry in [*record.clients, *record.evaluations]:
            entry.client = self.site_names.get(entry.node_id, entry.client)
        return arrays, record

    def _flag_repeated_rejections(self, history: list[RoundRecord]) -> None:
        """Mark ``flagged`` on the latest round's rejected sites that were also rejected in
        each of the ``flag_after`` - 1 rounds before (by node id), and log them."""
        if not self.flag_after or len(history) < self.flag_after:
            return
        window = history[-self.flag_after:]
        rejected = [{c.node_id for c in r.clients if c.outcome == "rejected"} for r in window]
        for entry in window[-1].clients:
            entry.flagged = all(entry.node_id in nodes for nodes in rejected)
            if entry.flagged:
                log(WARNING, "%s: update rejected %s rounds running (latest: %s)", entry.client, self.flag_after, entry.reason)

    def _learn_names(self, entries: list[SiteRound | SiteEvaluation]) -> None:
        for entry in entries:
            if entry.node_id is not None and entry.client != f"node-{entry.node_id}":
                self.site_names[entry.node_id] = entry.client


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _log_outcome(server_round: int, entry: SiteRound) -> None:
    """One line per site per round: what became of its training reply, and why."""
    if entry.outcome == "aggregated":
        spent = f", epsilon {entry.epsilon:.4f}" if entry.epsilon is not None else ", no DP"
        size = "masked" if entry.update_norm is None else f"update norm {entry.update_norm:.4g}"
        log(INFO, "round %s: %s aggregated (%s%s)", server_round, entry.client, size, spent)
    else:
        log(WARNING, "round %s: %s %s: %s", server_round, entry.client, entry.outcome, entry.reason)


def _client_entries(outcomes: list[ReplyOutcome], bytes_down: dict[int, int]) -> list[SiteRound]:
    answered = {o.node_id for o in outcomes}
    entries = [
        SiteRound(
            o.site, o.node_id, o.outcome, o.reason,
            num_examples=o.metrics.get("num-examples"),
            train_loss=o.metrics.get("train-loss"),
            epsilon=o.metrics.get("epsilon") if o.metrics.get("dp") else None,
            privacy={k: o.metrics[k] for k in _PRIVACY_METRICS if k in o.metrics},
            bytes_up=o.bytes_up,
            bytes_down=bytes_down.get(o.node_id, 0),
            ledger=o.ledger,
            update_norm=o.update_norm,
        )
        for o in outcomes
    ]
    entries += [
        SiteRound(f"node-{node}", node, "no-reply", "no reply before the round timeout", bytes_down=sent)
        for node, sent in bytes_down.items() if node not in answered
    ]
    return entries
