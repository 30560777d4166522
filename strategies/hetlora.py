"""HetLoRA as a Flower strategy: every site trains at its own LoRA rank.

The server keeps the global adapter at the maximum rank R (run config ``lora-rank``); a site
may set a lower rank r_i in its node config. Each round:

1. ``configure_train`` / ``configure_evaluate`` send each node the first r_i components of
   the global adapter (``hetero_rank.truncate_to_rank``): one message per rank. A node whose
   rank is not known yet (round 1, or it sent no valid update last round) gets the rank-R
   adapter and truncates it itself, so round 1 needs no knowledge of the ranks.
2. ``aggregate_train`` reads each node's rank off the shapes of its update (the tensors it
   actually trained, not a claim in its metrics) and aggregates with the rank-aware weighted
   mean of ``hetero_rank.aggregate_hetero``: component k of A and B is averaged over the
   sites with r_i > k only, weights n_i; components nobody trained keep their global value.

The global adapter stays a plain rank-R PEFT adapter, so checkpoints and
``PeftModel.from_pretrained`` work as for every other strategy. Screening must accept lower
ranks: wrap this strategy in ``ScreenedStrategy(rank_flexible=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.hetero_rank import aggregate_hetero, lora_rank_of, truncate_to_rank


class HetLoRA(FedAvg):
    """FedAvg's sampling and metrics; rank-aware messages and aggregation of the adapters."""

    def __init__(self, max_rank: int, **fedavg: Any) -> None:
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        super().__init__(**fedavg)
        self.max_rank = max_rank
        # node id -> the rank of its last valid update; rebuilt every round, so a node that
        # changed its rank or dropped out gets the full adapter again and recovers by itself.
        self.node_ranks: dict[int, int] = {}
        self._global: dict[str, np.ndarray] | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> HetLoRA: global rank %s, per-site ranks %s", self.max_rank, self.node_ranks or "not known yet")
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = {name: array.numpy() for name, array in arrays.items()}
        return self._at_node_ranks(super().configure_train(server_round, arrays, config, grid), arrays)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._at_node_ranks(super().configure_evaluate(server_round, arrays, config, grid), arrays)

    def _at_node_ranks(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        """Replace the adapter of every node of known rank r < R by its rank-r prefix."""
        decoded = {name: array.numpy() for name, array in arrays.items()}
        if lora_rank_of(decoded) != self.max_rank:
            raise ValueError(f"the global adapter has rank {lora_rank_of(decoded)}, expected {self.max_rank}")
        by_rank: dict[int, ArrayRecord] = {}
        out = []
        for message in messages:
            rank = self.node_ranks.get(message.metadata.dst_node_id, self.max_rank)
            if rank < self.max_rank:
                if rank not in by_rank:
                    truncated = truncate_to_rank(decoded, rank)
                    by_rank[rank] = ArrayRecord({name: Array(value) for name, value in truncated.items()})
                content = RecordDict({
                    self.arrayrecord_key: by_rank[rank],
                    self.configrecord_key: message.content[self.configrecord_key],
                })
                message = Message(content=content, dst_node_id=message.metadata.dst_node_id,
                                  message_type=message.metadata.message_type)
            out.append(message)
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        self.node_ranks = {}
        if not valid:
            return None, None
        updates = []
        for message in valid:
            arrays = {name: array.numpy() for name, array in message.content[self.arrayrecord_key].items()}
            self.node_ranks[message.metadata.src_node_id] = lora_rank_of(arrays)
            metrics = next(iter(message.content.metric_records.values()))
            updates.append((arrays, float(metrics[self.weighted_by_key])))
        aggregated = aggregate_hetero(updates, self.max_rank, global_arrays=self._global)
        contents = [message.content for message in valid]
        # Keys in the global adapter's order, so the result loads as the PEFT state dict it was.
        arrays = ArrayRecord({name: Array(np.ascontiguousarray(aggregated[name])) for name in self._global})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)
