"""HetLoRA as a Flower strategy: every site trains at its own LoRA rank.

The server keeps the global adapter at the maximum rank R (run config ``lora-rank``); a site
may set a lower rank r_i in its node config. Each round:

1. ``configure_train`` / ``configure_evaluate`` send each node the first r_i components of
   the global adapter (``fedlora.lora_ranks.truncate_to_rank``): one message per rank. A node whose
   rank is not known yet (round 1, or it sent no valid update last round) gets the rank-R
   adapter and truncates it itself, so round 1 needs no knowledge of the ranks.
2. ``aggregate_train`` reads each node's rank off the shapes of its update (the tensors it
   actually trained, not a claim in its metrics) and aggregates with the rank-aware weighted
   mean of :func:`aggregate_hetero`: component k of A and B is averaged over the
   sites with r_i > k only, weights n_i; components nobody trained keep their global value.

The global adapter stays a plain rank-R PEFT adapter, so checkpoints and
``PeftModel.from_pretrained`` work as for every other strategy. Screening must accept lower
ranks: wrap this strategy in ``ScreenedStrategy(rank_flexible=True)``.

Why zero padding (HetLoRA, Cho et al. 2024) rather than stacking (FLoRA, Wang et al.
2024): stacking concatenates the clients' A's and B's, which makes the aggregate of
``Σ_i B_i A_i`` exact but grows the global rank with the number of clients (Σ_i r_i).
That stacked adapter cannot be sent back to a site as the same-shape rank-r_i adapter it
trains (FLoRA has to merge it into the base weights and re-initialise the adapter each
round), nor stay a fixed-shape PEFT adapter for checkpoints. Zero padding keeps every
round's global adapter a plain rank-R PEFT adapter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.lora_ranks import lora_rank_of, pad_to_rank, rank_axis, truncate_to_rank


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


def aggregate_hetero(
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
    max_rank: int,
    global_arrays: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Rank-aware weighted mean of adapters of different ranks, at rank ``max_rank``.

    With client i of rank r_i and weight w_i (its number of examples), after padding
    every adapter to R = ``max_rank``, component k of each LoRA tensor is

        A[k, :] = Σ_{i: r_i > k} w_i A_i[k, :] / Σ_{i: r_i > k} w_i
        B[:, k] = Σ_{i: r_i > k} w_i B_i[:, k] / Σ_{i: r_i > k} w_i

    A client of rank r_i <= k never had component k: its padded zeros are absent values,
    not a vote for zero. A plain weighted mean over all clients would shrink component k
    by the factor Σ_{r_i>k} w_i / Σ_i w_i. Non-LoRA tensors (modules_to_save, e.g. the
    classifier head) are shared by all clients: plain weighted mean Σ_i w_i X_i / Σ_i w_i.

    As in FedAvg on LoRA, A and B are averaged separately, so the aggregate of the
    products B_i A_i is approximate (see ``strategies.ffa_lora``).

    Components no client trained this round (k >= max_i r_i, or zero total weight) keep
    their value in ``global_arrays`` when given, else they are zero. Pass the current
    global adapter: zero rows of A together with zero columns of B have zero gradient,
    so a zeroed component could never be trained again.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    weights = np.array([weight for _, weight in updates], dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0, not all zero; got {weights.tolist()}")
    keys = list(updates[0][0].keys())
    for arrays, _ in updates:
        if set(arrays.keys()) != set(keys):
            raise ValueError("updates have different tensor names")

    ranks = np.array([lora_rank_of(arrays) for arrays, _ in updates])
    if np.any(ranks > max_rank):
        raise ValueError(f"client ranks {ranks.tolist()} exceed max_rank {max_rank}")
    padded = [pad_to_rank(arrays, max_rank) for arrays, _ in updates]

    # trained_weight[i, k] = w_i if client i has component k, else 0.
    trained_weight = weights[:, None] * (np.arange(max_rank)[None, :] < ranks[:, None])

    aggregated: dict[str, np.ndarray] = {}
    for name in keys:
        stacked = np.stack([arrays[name] for arrays in padded]).astype(np.float64)
        axis = rank_axis(name)
        if axis is None:
            mean = np.tensordot(weights, stacked, axes=1) / weights.sum()
        else:
            # Shape the per-component weights to broadcast along this tensor's rank axis.
            shape = [1] * stacked.ndim
            shape[0], shape[1 + axis] = len(updates), max_rank
            component_weight = trained_weight.reshape(shape)
            total = component_weight.sum(axis=0)
            mean = (component_weight * stacked).sum(axis=0) / np.where(total > 0, total, 1.0)
            if global_arrays is not None:
                mean = np.where(total > 0, mean, global_arrays[name])
        aggregated[name] = mean.astype(updates[0][0][name].dtype)
    return aggregated
