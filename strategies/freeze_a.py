"""FFA-LoRA around any aggregation strategy: the wrapped strategy sees only B and the head.

Sites freeze every LoRA ``A`` at the run's seeded initial value and send back only the
tensors they train (``B`` and the task head): see ``strategies.ffa_lora`` for why averaging
B with a shared A is exact. This wrapper

- sends every site the full global adapter (a site cannot rebuild the seeded A itself), but
  hands the wrapped strategy only the trainable subset, so that whatever state it keeps
  (FedAdam's moments, the central-DP wrapper's clipping reference) has the shape of what
  comes back;
- puts the frozen A matrices back into the aggregate, in the global adapter's key order, so
  the result is again a complete PEFT adapter.

With FedAvg inside this is FFA-LoRA as published; any other strategy (median, trimmed mean,
Krum, FedAdam, central DP) then aggregates B alone. For a fixed A every such aggregate is
still one well-defined update ``B_agg A``; only the mean is the mean of the sites' updates.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.ffa_lora import merge_frozen, trainable_subset


def ffa_upload(arrays: ArrayRecord) -> ArrayRecord:
    """What an FFA-LoRA site sends back: everything but the frozen A matrices."""
    return ArrayRecord(trainable_subset(arrays))


class FreezeA(Strategy):
    """``inner`` aggregates B and the head; the frozen A's come back from the global adapter."""

    def __init__(self, inner: Strategy, arrayrecord_key: str = "arrays") -> None:
        self.inner = inner
        self.arrayrecord_key = arrayrecord_key
        self._global: ArrayRecord | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> FFA-LoRA: LoRA A frozen, the strategy below aggregates B and the head")
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = arrays
        messages = list(self.inner.configure_train(server_round, ffa_upload(arrays), config, grid))
        for message in messages:
            # Messages may share one RecordDict; putting the full adapter in is idempotent.
            message.content[self.arrayrecord_key] = arrays
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise RuntimeError("aggregate_train before configure_train: no global adapter to take A from")
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        return ArrayRecord(merge_frozen(self._global, arrays)), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
