"""What a strategy carries from round to round besides the global adapter: the moments of a
server-side optimizer.

FedAdam and FedYogi (Reddi et al. 2021, arXiv 2003.00295) treat the mean update Δ_t as a
pseudo-gradient and keep, per tensor,

    m_t = β₁ m_{t−1} + (1 − β₁) Δ_t               (first moment)
    v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²              (FedAdam; FedYogi: v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²))
    θ_{t+1} = θ_t + η_t m_t / (√v_t + τ)

with η_t's bias correction computed from the round number alone. So (m_t, v_t) plus the round is
the whole state: checkpointed with each round's adapter and put back on ``--resume``, a resumed
run takes exactly the steps an uninterrupted one would. Other strategies keep nothing.
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import FedAdam, FedYogi, Strategy

MOMENTS = ("m_t", "v_t")


def _server_optimizer(strategy: Strategy) -> FedAdam | FedYogi | None:
    """The FedAdam/FedYogi at the core of fedlora's wrappers (each keeps its wrapped one as ``inner``)."""
    while not isinstance(strategy, FedAdam | FedYogi) and hasattr(strategy, "inner"):
        strategy = strategy.inner
    return strategy if isinstance(strategy, FedAdam | FedYogi) else None


def optimizer_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """``{"m_t/<tensor>": ..., "v_t/<tensor>": ...}``; empty before the first step or without a
    server-side optimizer."""
    optimizer = _server_optimizer(strategy)
    if optimizer is None:
        return {}
    return {f"{moment}/{name}": np.ascontiguousarray(value)
            for moment in MOMENTS for name, value in (getattr(optimizer, moment) or {}).items()}


def load_optimizer_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Put back what :func:`optimizer_state` returned; a state for a strategy without a
    server-side optimizer is an error (the checkpoint belongs to another strategy)."""
    if not state:
        return
    optimizer = _server_optimizer(strategy)
    if optimizer is None:
        raise ValueError("the checkpoint holds server-optimizer moments, but this run's strategy keeps none")
    for moment in MOMENTS:
        prefix = f"{moment}/"
        setattr(optimizer, moment, {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)} or None)
