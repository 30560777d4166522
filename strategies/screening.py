"""Screening of replies before any strategy aggregates them.

Wraps a Flower strategy the way Flower's own DP wrappers do. Every training reply ends up
in exactly one :class:`ReplyOutcome`:

- ``aggregated``: a well-formed adapter update, passed on to the wrapped strategy;
- ``rejected``: malformed or non-finite (``strategies.validation``), or far larger than the
  round's other updates, or no change at all (``strategies.norm_screen``), left out;
- ``refused``: the site chose not to train (budget exhausted, policy, broken data) and said
  why in its ``status`` record;
- ``failed``: the site's ClientApp raised, or the connection failed (Flower error reply);
- ``no-reply``: the site was sent work but never answered (marked by the caller).

A compressed upload (``upload-dtype``, ``fedlora.upload_codec``) is decoded back to float32
values first, against the global adapter sent; its ``bytes_up`` are what came over the wire,
and one that does not decode is rejected, saying why.

A round whose aggregated replies number fewer than ``min_valid`` fails with a clear
:class:`TooFewUpdates` error; the global adapter then stays as it was.

Under SecAgg+ (``aggregate_secure``) no single update reaches the server: each reply is
classified as above, a site whose masked vector is not in the sum is ``failed`` (it dropped
out), and the new adapter is the global one plus the protocol's weighted mean update.

The aggregate keeps the dtype of every global tensor: a server-side optimizer may promote it
(Flower's FedAdam returns float64), and sites, validation and checkpoints expect what was sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.upload_codec import decode_upload
from strategies.norm_screen import NormScreen
from strategies.validation import TooFewUpdates, spec_from_arrays, update_norm, validate_update

if TYPE_CHECKING:
    from server.history import RoundRecord
    from server.secure_aggregation import SecureRound
    from strategies.central_dp import CentralDP


@dataclass
class ReplyOutcome:
    node_id: int
    site: str
    outcome: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    ledger: dict[str, Any] | None = None  # the site's ledger anchor: {"rows": n, "head": hash}
    update_norm: float | None = None  # ‖reply − global‖₂ of a well-formed update


# Status codes (client.refusals) for which a site did not choose to sit out but broke down.
FAILURE_CODES = frozenset({"internal-error", "disclosure-blocked"})


def describe_reply(msg: Message) -> ReplyOutcome:
    """Classify a reply that needs no validation (error, refusal) or prepare one that does."""
    node_id = msg.metadata.src_node_id
    if msg.has_error():
        return ReplyOutcome(node_id, f"node-{node_id}", "failed", msg.error.reason)
    content = msg.content
    site = str(content["site"]["name"]) if "site" in content.config_records else f"node-{node_id}"
    metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
    ledger = dict(content["ledger"]) if "ledger" in content.config_records else None
    if "status" in content.config_records:
        code, setting = str(content["status"]["status"]), str(content["status"].get("setting", ""))
        outcome = "failed" if code in FAILURE_CODES else "refused"
        reason = f"{code} (setting {setting})" if setting else code
        return ReplyOutcome(node_id, site, outcome, reason, metrics, ledger=ledger)
    bytes_up = content["arrays"].count_bytes() if "arrays" in content.array_records else 0
    return ReplyOutcome(node_id, site, "aggregated", "", metrics, bytes_up, ledger)


class ScreenedStrategy(Strategy):
    """Validate every update (keys, shapes, dtypes, finiteness), then screen the well-formed
    ones by size (``norm_screen``), before ``inner`` sees any.

    ``expected_upload`` maps the global arrays sent this round to what a site must send back
    (identity, or only the trainable tensors under FFA-LoRA). ``central_dp`` is the central-DP
    wrapper somewhere inside ``inner``, if any: its cumulative ε is reported per round.
    """

    def __init__(
        self,
        inner: Strategy,
        min_valid: int = 1,
        norm_screen: NormScreen | None = None,
        rank_flexible: bool = False,
        expected_upload: Callable[[ArrayRecord], ArrayRecord] = lambda arrays: arrays,
        central_dp: CentralDP | None = None,
        upload_dtype: str = "fp32",
    ) -> None:
        self.inner = inner
        self.upload_dtype = upload_dtype
        self.central_dp = central_dp
        self.min_valid = min_valid
        self.norm_screen = norm_screen or NormScreen()
        self.rank_flexible = rank_flexible
        self.expected_upload = expected_upload
        self.train_outcomes: list[ReplyOutcome] = []
        self.evaluate_outcomes: list[ReplyOutcome] = []
        self._reference: ArrayRecord | None = None

    def summary(self) -> None:
        self.inner.summary()

    @property
    def central_epsilon(self) -> float | None:
        """Cumulative site-level ε of central DP so far; None without central DP."""
        return None if self.central_dp is None else self.central_dp.epsilon

    def central_release(self) -> dict[str, float | int] | None:
        """What central DP released in the round just aggregated, for its history record
        (``central_dp``): ``noise_multiplier``, ``clipping_norm``, ``num_sampled_clients`` and
        ``delta``; None when nothing was released (no central DP, or the round failed)."""
        return None if self.central_dp is None else self.central_dp.round_release

    def restore(self, history: Sequence[RoundRecord]) -> None:
        """Resume after ``history``: the norm screen's reference is the norms accepted last,
        and the central-DP accountant composes every earlier release at the noise multiplier
        recorded with it, never at this run's, so that changing ``central-dp-noise-multiplier``
        on resume cannot shrink the reported ε."""
        accepted = [[c.update_norm for c in r.aggregated if c.update_norm] for r in history]
        self.norm_screen.restore(next((norms for norms in reversed(accepted) if norms), []))
        if self.central_dp is not None:
            self.central_dp.replay(_central_releases(history))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._reference = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        reference = self.expected_upload(self._reference)
        spec = spec_from_arrays(reference, self.rank_flexible)
        self.train_outcomes, well_formed = [], {}
        for msg in replies:
            outcome = describe_reply(msg)
            if outcome.outcome == "aggregated":
                if "arrays" not in msg.content.array_records or "num-examples" not in outcome.metrics:
                    reason = "reply has no adapter or no num-examples"
                else:
                    reason = self._decode(msg) or validate_update(msg.content["arrays"], spec)
                if reason:
                    outcome.outcome, outcome.reason = "rejected", reason
                else:
                    outcome.update_norm = update_norm(msg.content["arrays"], reference)
                    well_formed[len(self.train_outcomes)] = msg
            self.train_outcomes.append(outcome)
        too_large = self.norm_screen.reasons({i: self.train_outcomes[i].update_norm for i in well_formed})
        for index, reason in too_large.items():
            self.train_outcomes[index].outcome, self.train_outcomes[index].reason = "rejected", reason
        valid = [msg for index, msg in well_formed.items() if index not in too_large]
        if len(valid) < self.min_valid:  # each site's own reason is in its outcome, logged once
            raise TooFewUpdates(f"round {server_round}: {len(valid)} valid update(s), fewer than "
                                f"min-valid-updates = {self.min_valid}")
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        return (None if arrays is None else _with_dtypes_of(self._reference, arrays)), metrics

    def aggregate_secure(self, server_round: int, secure: SecureRound) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A SecAgg+ round: the global adapter plus the mean of the updates in the masked sum;
        training metrics are the sites' (public) releases, weighted by num-examples."""
        self.train_outcomes = []
        for msg in secure.replies:
            outcome = describe_reply(msg)
            outcome.bytes_up = secure.bytes_up.get(outcome.node_id, 0)
            if outcome.outcome == "aggregated" and outcome.node_id not in secure.summed:
                stage = secure.dropped.get(outcome.node_id, "an earlier stage")
                outcome.outcome, outcome.reason = "failed", f"dropped out of secure aggregation at {stage}"
            self.train_outcomes.append(outcome)
        if secure.mean_update is None:
            raise TooFewUpdates(f"round {server_round}: {secure.failure}")
        aggregated = [o for o in self.train_outcomes if o.outcome == "aggregated"]
        if len(aggregated) < self.min_valid:
            raise TooFewUpdates(f"round {server_round}: {len(aggregated)} update(s) in the secure sum, fewer than "
                                f"min-valid-updates = {self.min_valid}")
        trained = self.expected_upload(self._reference)
        arrays = ArrayRecord({
            name: Array(array.numpy() + secure.mean_update[name] if name in trained else array.numpy())
            for name, array in self._reference.items()
        })
        weights = [float(o.metrics.get("num-examples", 0.0)) for o in aggregated]
        losses = [(w, o.metrics["train-loss"]) for w, o in zip(weights, aggregated, strict=True) if "train-loss" in o.metrics]
        total = sum(w for w, _ in losses)
        metrics = MetricRecord({"train-loss": sum(w * loss for w, loss in losses) / total}) if total > 0 else None
        return _with_dtypes_of(self._reference, arrays), metrics

    def _decode(self, msg: Message) -> str:
        """Put the float32 values of a compressed upload in place of its wire form; the
        reason when it does not decode."""
        try:
            msg.content["arrays"] = decode_upload(msg.content["arrays"], self._reference, self.upload_dtype)
        except ValueError as err:
            return f"upload-dtype {self.upload_dtype}: {err}"
        return ""

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self.evaluate_outcomes, usable = [], []
        for msg in replies:
            outcome = describe_reply(msg)
            if outcome.outcome == "aggregated" and "eval-loss" not in outcome.metrics:
                outcome.outcome, outcome.reason = "refused", "no held-out examples"
            if outcome.outcome == "aggregated":
                outcome.outcome = "evaluated"
                usable.append(msg)
            self.evaluate_outcomes.append(outcome)
        return self.inner.aggregate_evaluate(server_round, usable) if usable else None


def _central_releases(history: Sequence[RoundRecord]) -> list[dict[str, Any]]:
    """The central-DP releases of ``history``, each as its record's ``central_dp``.

    A round released an aggregate unless its ``failure`` is set. A released round must record
    how central DP noised it; otherwise its cost is unknown (a record written before
    ``central_dp`` was recorded) or unbounded (aggregated without central DP), and any ε
    reported after a resume could be an under-count, so the resume is refused.
    """
    releases = []
    for record in history:
        if record.central_dp is not None:
            releases.append(record.central_dp)
        elif not record.failure:
            raise ValueError(
                f"cannot resume central DP: round {record.round}'s history record has no central_dp (the noise "
                "multiplier, clipping norm and number of sites its release used): it was aggregated without central "
                "DP, or written before central_dp was recorded, so its cost cannot be replayed and resuming would "
                "under-count epsilon. Start a new run instead."
            )
    return releases


def _with_dtypes_of(reference: ArrayRecord, arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` with each tensor cast to the dtype of the same-named reference tensor."""
    cast = {}
    for name, array in arrays.items():
        value = array.numpy()
        dtype = np.dtype(reference[name].dtype) if name in reference else value.dtype
        cast[name] = Array(np.ascontiguousarray(value, dtype=dtype))
    return ArrayRecord(cast)
