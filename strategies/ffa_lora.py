"""FFA-LoRA (Sun et al., ICLR 2024): freeze A, train and send only B.

Every site initialises the LoRA down-projections A from the same seed (or receives them
from the server once) and never trains them; only the up-projections B (and any
modules_to_save) are trained, sent and averaged.

Why averaging is then exact. The weight update of site i is ``ΔW_i = B_i A``; the
server wants the (weighted) mean of the updates, and by linearity

    Σ_i w_i (B_i A) / Σ_i w_i = (Σ_i w_i B_i / Σ_i w_i) A,

so averaging the B's and multiplying by the shared A gives exactly the mean update.
With both factors trained, FedAvg averages A and B separately and
``mean_i(B_i A_i) != mean_i(B_i) mean_i(A_i)``: for two equally weighted sites

    ½(B_1 A_1 + B_2 A_2) − ¼(B_1 + B_2)(A_1 + A_2) = ¼ (B_1 − B_2)(A_1 − A_2),

a cross term that is zero only when the sites agree on A or on B. Freezing A also
halves what is sent and, under DP-SGD, keeps the update linear in the clipped noisy
gradient of B instead of a product of two noisy factors.

**Around any strategy** (:class:`FreezeA`). Sites freeze every LoRA ``A`` at the run's seeded
initial value and send back only the tensors they train (``B`` and the task head). The wrapper

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

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.lora_ranks import is_lora_a

X = TypeVar("X")


def is_frozen_key(name: str) -> bool:
    """True for the tensors FFA-LoRA freezes: the LoRA A matrices (``...lora_A.weight``)."""
    return is_lora_a(name)


def trainable_subset(arrays: Mapping[str, X]) -> dict[str, X]:
    """The tensors a site sends under FFA-LoRA: everything except the frozen A's."""
    return {name: value for name, value in arrays.items() if not is_frozen_key(name)}


def merge_frozen(global_arrays: Mapping[str, X], update: Mapping[str, X]) -> dict[str, X]:
    """A full adapter from an aggregated trainable-only ``update`` and the frozen A's.

    The result has the keys of ``global_arrays``, in its order (so it loads as a PEFT
    state dict): frozen tensors from ``global_arrays``, the rest from ``update``.
    Raises ValueError when ``update`` holds a frozen tensor (a site that trained A broke
    the exactness above) or its keys differ from the global trainable ones.
    """
    frozen_sent = [name for name in update if is_frozen_key(name)]
    if frozen_sent:
        raise ValueError(f"update contains frozen LoRA A tensors: {sorted(frozen_sent)[:5]}")
    expected = set(trainable_subset(global_arrays))
    if set(update) != expected:
        missing = sorted(expected - set(update))[:5]
        unexpected = sorted(set(update) - expected)[:5]
        raise ValueError(f"update keys differ: missing {missing}, unexpected {unexpected}")
    return {
        name: global_arrays[name] if is_frozen_key(name) else update[name]
        for name in global_arrays
    }


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
