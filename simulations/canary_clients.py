"""Canary clients for the site-level audit (``privacy.canary_cosines``; Andrew et al. 2023).

k canary clients take part in every round of a simulated federation. Canary j's update is a
fixed direction u_j, uniform on the unit sphere over the tensors the sites send and the mean
averages (drawn from the auditor's secret and j, never written anywhere), scaled to a site's
norm s_t:

- under central DP, s_t = ``central-dp-clipping-norm`` C: the largest update a site can have
  after clipping, so a canary is the worst case the accountant covers;
- without it, s_t = the median norm of the round's site updates, so a canary is a typical site.

They join the round's mean as a site does under central DP's zero-out adjacency
(``strategies.central_dp``): with m site updates in the round, the mean becomes

    (1/m) (Σ_i Δ_i + s_t Σ_j u_j),

and central DP adds its noise of std z C / m. So each canary is a site that central DP must
hide, while m (and the noise) is what the real sites alone make it. The k canaries add
s_t ‖Σ_j u_j‖ / m ≈ s_t √k / m to the mean, in directions orthogonal to almost everything: next
to central DP's noise, of norm z C √d / m, that is a share √(k/d)/z (0.04 for 100 canaries on
MiniLM's 75,000 adapter values at z = 1). Without central DP it is √k / m times a site's update
(3.3 for 100 canaries and 3 sites): the canaries then change the model, which is why
``fedlora privacy empirical`` inserts them by default only under central DP. (With a mean
weighted by example counts, (1/m) s_t u_j is the share of a site of average weight.)

**Where they go in.** The noise is additive and independent of the updates, so adding
(s_t / m) Σ_j u_j to the *released* mean gives exactly the distribution of adding it before the
noise. :class:`InsertCanaries` therefore wraps what screening hands the valid updates to (central
DP and the mean included), and Flower's accounted FedAvg path, which refuses any other
aggregation, stays as it is. A canary is not screened and not clipped (its norm is ≤ C
already). Only a plain mean (``fedavg``, ``fedprox``, with or without FFA-LoRA) treats a site
this way; a median or Krum does not, and there the audit says it does not apply.

``k`` more directions are never inserted: their cosines measure the null distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.run_config import RunSettings


@dataclass
class CanaryClients:
    count: int  # k inserted canaries; k more are never inserted
    secret: int  # the auditor's: seeds every direction
    # The tensors (name → shape) the canaries went into, as the first round's mean met them.
    inserted_into: dict[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if self.count < 2:
            raise ValueError(f"canary clients: at least 2, got {self.count}")

    def directions(self, shapes: Mapping[str, tuple[int, ...]], inserted: bool) -> Iterator[np.ndarray]:
        """The unit directions u_j over the flattened tensors (sorted by name): the inserted
        canaries' (j < k), or the k never-inserted ones (k ≤ j < 2k)."""
        dimension = sum(int(np.prod(shape)) for shape in shapes.values())
        first = 0 if inserted else self.count
        for j in range(first, first + self.count):
            v = np.random.default_rng([self.secret, j]).standard_normal(dimension)
            yield v / np.linalg.norm(v)

    def cosines(self, change: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """cos(u_j, Δ) of the inserted and of the never-inserted canaries, for the run's change
        Δ = θ_T − θ_0 of the tensors the aggregator averaged."""
        if _shapes(change) != self.inserted_into:
            raise ValueError("the change measured is not over the tensors the canary clients went into"
                             if self.inserted_into else "no round's mean took the canary clients")
        flat = _flatten(change)
        norm = np.linalg.norm(flat)
        if norm == 0:
            raise ValueError("the global adapter did not change over the run: no cosine to measure")
        return tuple(np.array([u @ flat / norm for u in self.directions(_shapes(change), inserted)])
                     for inserted in (True, False))

    def insertion(self, settings: RunSettings) -> Callable[[Strategy], Strategy]:
        """What ``strategies.factory.build_strategy`` wraps the run's aggregation in."""
        strategy = settings.strategy
        norm = strategy.central_dp_clipping_norm if strategy.central_dp else None
        return lambda aggregation: InsertCanaries(aggregation, self, norm)


def _flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[name], dtype=np.float64).ravel() for name in sorted(arrays)])


class InsertCanaries(Strategy):
    """``inner``'s aggregate of the m valid site updates, plus (s_t / m) Σ_j u_j over the
    tensors the sites sent (module docstring)."""

    def __init__(self, inner: Strategy, canaries: CanaryClients, clipping_norm: float | None) -> None:
        self.inner = inner
        self.canaries = canaries
        self.clipping_norm = clipping_norm
        self._global: ArrayRecord | None = None
        self._sum: dict[str, np.ndarray] | None = None  # Σ_j u_j per tensor; the directions never change

    def summary(self) -> None:
        log(INFO, "\t├──> %d canary clients in every round's mean (site-level audit)", self.canaries.count)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None or self._global is None or not replies:
            return arrays, metrics
        if self._sum is None:
            shapes = {name: tuple(array.shape) for name, array in sorted(replies[0].content["arrays"].items())}
            total = np.zeros(sum(int(np.prod(shape)) for shape in shapes.values()))
            for direction in self.canaries.directions(shapes, inserted=True):  # one at a time: k × d may not fit
                total += direction
            self._sum, self.canaries.inserted_into = _split(total, shapes), shapes
        site_norm = self.clipping_norm or float(np.median([np.linalg.norm(_flatten(self._update(r))) for r in replies]))
        scale = site_norm / len(replies)
        canaried = {}
        for name, array in arrays.items():
            value = array.numpy()
            if name in self._sum:
                value = np.ascontiguousarray(value + scale * self._sum[name], dtype=value.dtype)
            canaried[name] = Array(value)
        return ArrayRecord(canaried), metrics

    def _update(self, reply: Message) -> dict[str, np.ndarray]:
        """Δ_i = what the site sent − the global adapter, per tensor it sent."""
        return {name: array.numpy().astype(np.float64) - self._global[name].numpy()
                for name, array in reply.content["arrays"].items()}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def _shapes(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(arrays[name].shape) for name in sorted(arrays)}


def _split(flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The inverse of :func:`_flatten` for tensors of ``shapes`` (sorted by name)."""
    out, offset = {}, 0
    for name in sorted(shapes):
        size = int(np.prod(shapes[name]))
        out[name] = flat[offset:offset + size].reshape(shapes[name])
        offset += size
    return out
