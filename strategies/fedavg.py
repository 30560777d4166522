"""Weighted FedAvg over adapter tensors, and its FFA-LoRA variant.

FedAvg (Flower's own): theta = sum_i (n_i / n) theta_i over the adapter tensors of the sites
that trained, n_i their example counts. FFA-LoRA (Sun et al., ICLR 2024) freezes every LoRA
``A`` at its shared initial value and trains only ``B`` (and the head); sites send only those,
and the server puts the frozen ``A`` back after averaging: exact, since
mean_i(B_i A) = (mean_i B_i) A.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.ffa_lora import merge_frozen, trainable_subset


class FfaLoraFedAvg(FedAvg):
    """FedAvg on B and the head only; the frozen A matrices come back from the global adapter."""

    _global: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        return ArrayRecord(merge_frozen(self._global, arrays)), metrics


def ffa_upload(arrays: ArrayRecord) -> ArrayRecord:
    """What an FFA-LoRA site sends back: everything but the frozen A matrices."""
    return ArrayRecord(trainable_subset(arrays))
